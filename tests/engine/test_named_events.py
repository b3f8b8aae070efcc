"""Named events across runs: a latch. The first ``emit_event`` sets it; every run
waiting for it gets that payload once, the ones already waiting and the ones that
come later; later emits change nothing. On every store."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from substantial import ClientError, Context, RunStatus, workflow
from substantial.backends import Backend
from substantial.testing import TestEnvironment


@workflow()
async def waiter(c: Context) -> list[Any]:
    first = await c.wait_for_event("prices-published")
    await c.sleep(timedelta(hours=1))  # evicted and replayed: still one payload
    again = await c.wait_for_event("prices-published")  # set: returns at once
    return [first, again]


@workflow()
async def publisher(c: Context, version: int) -> bool:
    return await c.emit_event("prices-published", {"version": version})


@workflow()
async def impatient(c: Context) -> str:
    try:
        await c.wait_for_event("never", timeout=timedelta(days=1))
    except TimeoutError:
        return "timed out"
    return "got it"


async def test_early_and_late_waiters_each_get_the_first_payload_once(backend: Backend) -> None:
    async with TestEnvironment(waiter, publisher, backend=backend) as env:
        c = env.conductor
        early = [await c.start(waiter) for _ in range(3)]
        await env.run_until_idle()
        assert all([await h.status() == RunStatus.SUSPENDED for h in early])

        assert await c.emit_event("prices-published", {"version": 1}) is True
        await env.run_until_idle()
        for h in early:  # woken once, and that wake-up was the one it received
            woken = [e for e in await env.history(h.run_id) if e.kind == "event"]
            assert len(woken) == 1 and woken[0].seq is not None

        assert await c.emit_event("prices-published", {"version": 2}) is False  # no-op
        late = await c.start(waiter)
        from_a_run = await c.start(publisher, {"version": 3})
        assert await from_a_run.result(timeout=30) is False
        for h in [*early, late]:
            assert await h.result(timeout=30) == [{"version": 1}, {"version": 1}]
        woken_late = [e for e in await env.history(late.run_id) if e.kind == "event"]
        assert woken_late == []  # it found the latch set: nobody had to wake it


async def test_a_run_can_set_the_latch_for_others(backend: Backend) -> None:
    async with TestEnvironment(waiter, publisher, backend=backend) as env:
        h = await env.conductor.start(waiter)
        await env.run_until_idle()
        assert await (await env.conductor.start(publisher, {"version": 7})).result() is True
        assert await h.result(timeout=30) == [{"version": 7}, {"version": 7}]


async def test_a_wait_for_an_event_never_emitted_times_out(backend: Backend) -> None:
    async with TestEnvironment(impatient, backend=backend) as env:
        h = await env.conductor.start(impatient)
        assert await h.result(timeout=30) == "timed out"


async def test_an_event_name_must_be_a_non_empty_string() -> None:
    async with TestEnvironment(waiter) as env:
        with pytest.raises(ClientError, match="non-empty string"):
            await env.conductor.emit_event("", 1)


async def test_latches_stay_out_of_listings_and_counts_unless_asked_for() -> None:
    """A latch is a run in the store, but the engine's bookkeeping: an operator's
    list of runs, the counts and the runs a deploy replays leave it out."""
    async with TestEnvironment(publisher) as env:
        run = await env.conductor.start(publisher, {"version": 1})
        assert await run.result() is True
        await env.conductor.emit_event("regions-back", None)
        assert [s.run_id for s in await env.conductor.search(None)] == [run.run_id]
        assert set(await env.conductor.counts()) == {"publisher"}
        assert await env.conductor.unfinished_runs() == []
        latches = await env.conductor.search("substantial.event")  # asked for by name
        assert sorted(s.run_id for s in latches) == [
            "substantial.event:prices-published",
            "substantial.event:regions-back",
        ]
