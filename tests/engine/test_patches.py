"""``patched()`` and ``deprecate_patch()``: changing workflow code under runs in
flight. Each "deploy" is a worker with another version of the workflow named
``order``, on one store: a run that passed the patch point under the old code
keeps it through every replay, a run that reaches the point under the new code
takes (and records) the patch, and a deprecated patch still replays the runs
that recorded it while new runs record nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from substantial import Conductor, Context, NonDeterminismError, RunFailed, Workflow, workflow
from substantial.backends import Backend
from substantial.backends.memory import MemoryBackend
from substantial.testing import TestEnvironment, replay

from .helpers import eventually, worker

effects: list[tuple[str, str]] = []  # (run id, step) for every effect run


def step(c: Context, name: str) -> Callable[[], str]:
    def effect() -> str:
        effects.append((c.run_id, name))
        return name

    return effect


@workflow(name="order")
async def v1(c: Context) -> list[str]:
    done = [await c.save(step(c, "A"), name="A")]
    await c.receive("go")
    done.append(await c.save(step(c, "B"), name="B"))
    await c.receive("finish")
    return done


@workflow(name="order")
async def v2(c: Context) -> list[str]:
    done = [await c.save(step(c, "A"), name="A")]
    await c.receive("go")
    if c.patched("fraud-check"):
        done.append(await c.save(step(c, "fraud"), name="fraud"))
    done.append(await c.save(step(c, "B"), name="B"))
    await c.receive("finish")
    return done


@workflow(name="order")
async def v3(c: Context) -> list[str]:
    done = [await c.save(step(c, "A"), name="A")]
    await c.receive("go")
    c.deprecate_patch("fraud-check")
    done.append(await c.save(step(c, "fraud"), name="fraud"))
    done.append(await c.save(step(c, "B"), name="B"))
    await c.receive("finish")
    return done


@asynccontextmanager
async def deployed(backend: Backend, version: Workflow[Any]) -> AsyncIterator[Conductor]:
    """A worker running ``version`` of ``order``; every wait evicts the run
    (hot_wait 0), so each event is taken in by a full replay of the log."""
    c = Conductor(backend)
    c.register(version)
    try:
        async with worker(c, hot_wait=0):
            yield c
    finally:
        await c.close()


async def wait_status(c: Conductor, run_id: str, status: str) -> None:
    async def check() -> bool:
        return str(await c.handle(run_id).status()) == status

    await eventually(check)


@pytest.fixture
def store() -> Backend:
    effects.clear()
    return MemoryBackend()


async def steps_of(run_id: str) -> list[str]:
    return [name for rid, name in effects if rid == run_id]


async def test_a_run_past_the_patch_point_keeps_the_old_code_through_replays(
    store: Backend,
) -> None:
    async with deployed(store, v1) as c:
        old = (await c.start(v1)).run_id
        await c.handle(old).send("go")
        await wait_status(c, old, "SUSPENDED")  # B is recorded: waits for "finish"
        assert await steps_of(old) == ["A", "B"]
    async with deployed(store, v2) as c:
        new = (await c.start(v2)).run_id
        await c.handle(new).send("go")
        await wait_status(c, new, "SUSPENDED")
        await c.handle(old).send("finish")  # a replay under v2: patched() is False
        assert await c.handle(old).result(timeout=10) == ["A", "B"]
        await c.handle(new).send("finish")  # a replay: the marker says True again
        assert await c.handle(new).result(timeout=10) == ["A", "fraud", "B"]
        history = await c.history(new)
        assert [e.name for e in history.entries if e.kind == "patch"] == ["fraud-check"]
        assert not [e for e in (await c.history(old)).entries if e.kind == "patch"]
    assert await steps_of(old) == ["A", "B"]  # never the fraud check, nothing twice
    assert await steps_of(new) == ["A", "fraud", "B"]


async def test_a_run_that_reaches_the_point_after_the_deploy_takes_the_patch(
    store: Backend,
) -> None:
    async with deployed(store, v1) as c:
        run = (await c.start(v1)).run_id
        await wait_status(c, run, "SUSPENDED")  # waits for "go", before the patch point
    async with deployed(store, v2) as c:
        await c.handle(run).send("go")
        await wait_status(c, run, "SUSPENDED")
        await c.handle(run).send("finish")
        assert await c.handle(run).result(timeout=10) == ["A", "fraud", "B"]
    assert await steps_of(run) == ["A", "fraud", "B"]


async def test_a_deprecated_patch_replays_runs_with_the_marker_and_new_runs_record_none(
    store: Backend,
) -> None:
    async with deployed(store, v2) as c:
        marked = (await c.start(v2)).run_id
        await c.handle(marked).send("go")
        await wait_status(c, marked, "SUSPENDED")  # the marker and the fraud check are in
    async with deployed(store, v3) as c:
        fresh = (await c.start(v3)).run_id
        for run in (marked, fresh):
            await c.handle(run).send("go")
            await c.handle(run).send("finish")
            assert await c.handle(run).result(timeout=10) == ["A", "fraud", "B"]
        assert not [e for e in (await c.history(fresh)).entries if e.kind == "patch"]
    assert await steps_of(marked) == ["A", "fraud", "B"]
    assert await steps_of(fresh) == ["A", "fraud", "B"]


async def test_a_deprecated_patch_under_a_run_that_never_took_it_is_a_divergence(
    store: Backend,
) -> None:
    """deprecate_patch is for when the old runs are gone: one still in flight
    fails with NonDeterminismError naming the call, instead of running new code
    in the middle of old history."""
    async with deployed(store, v1) as c:
        old = (await c.start(v1)).run_id
        await c.handle(old).send("go")
        await wait_status(c, old, "SUSPENDED")
    async with deployed(store, v3) as c:
        await c.handle(old).send("finish")
        with pytest.raises(RunFailed, match="save") as info:
            await c.handle(old).result(timeout=10)
        assert info.value.error_type == NonDeterminismError.__name__


async def test_a_patch_id_must_be_a_non_empty_string(store: Backend) -> None:
    @workflow(name="bad_patch")
    async def bad_patch(c: Context) -> str:
        try:
            c.patched("")
        except ValueError as exc:
            return str(exc)
        return "accepted"

    c = Conductor(store)
    c.register(bad_patch)
    async with worker(c):
        assert "non-empty string" in await (await c.start(bad_patch)).result(timeout=10)
    await c.close()


slips: list[tuple[str, int]] = []


def plus_one(n: int) -> Callable[[], int]:
    return lambda: n + 1


def slip(run_id: str, n: int) -> Callable[[], None]:
    return lambda: slips.append((run_id, n))


@workflow(name="payroll")
async def payroll_v1(c: Context, rounds: int) -> int:
    n = 0
    while n < rounds:
        n = await c.save(plus_one(n), name="pay", key="pay")
        await c.sleep(timedelta(days=1), key="period")
        await c.compact()
    return n


@workflow(name="payroll")
async def payroll_v2(c: Context, rounds: int) -> int:
    n = 0
    while n < rounds:
        n = await c.save(plus_one(n), name="pay", key="pay")
        if c.patched("payslip"):
            await c.save(slip(c.run_id, n), name="payslip", key="payslip")
        await c.sleep(timedelta(days=1), key="period")
        await c.compact()
    return n


async def test_a_patch_in_a_compacted_loop_starts_at_the_next_round_and_stays_one_record(
    store: Backend,
) -> None:
    """The guide's payroll loop, compacted every round, gets a new step behind a
    patch while a run is in its fourth round: it sends payslips from its next
    round on, its log keeps one marker however many rounds record it, and its
    history replays against the new code."""
    slips.clear()
    async with TestEnvironment(payroll_v1, backend=store) as env:
        h = await env.conductor.start(payroll_v1, {"rounds": 6}, run_id="pay-1")
        await env.advance(timedelta(days=3, hours=12))  # rounds 1-4 paid, asleep in 4
        paused_at = env.now()
    async with TestEnvironment(payroll_v2, backend=store, start=paused_at) as env:
        assert await env.conductor.handle(h.run_id).result(timeout=10) == 6
        history = await env.conductor.export([h.run_id])
    assert slips == [("pay-1", 5), ("pay-1", 6)]
    markers = [r for r in history.runs[0].records if r.get("p") == "patch"]
    assert len(markers) == 1
    assert (await replay(history, payroll_v2)).outcome == "ended"
