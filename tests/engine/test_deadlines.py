"""Deadlines: ``@workflow(timeout=)`` and ``start(timeout=)``. A run still going
at its deadline ends CANCELLED saying so, wherever it is (asleep, waiting for an
event or a child, waiting in place), and its descendants are cancelled too. On
every store, on the TestEnvironment's virtual clock (days pass at once)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from substantial import ClientError, Conductor, Context, RunCancelled, RunStatus, workflow
from substantial.backends import Backend
from substantial.testing import TestEnvironment

from .helpers import worker

DAY = timedelta(days=1)


@workflow(timeout=DAY)
async def slow_sleeper(c: Context) -> str:
    await c.sleep(timedelta(days=3))
    return "woke"


@workflow()
async def waits_for_go(c: Context) -> Any:
    return await c.receive("go")


@workflow(timeout=timedelta(hours=2))
async def parent(c: Context) -> Any:
    child = await c.start_child(waits_for_go)
    return await child.result()


async def test_a_run_past_its_deadline_ends_cancelled_saying_so(backend: Backend) -> None:
    async with TestEnvironment(slow_sleeper, backend=backend) as env:
        t0 = env.now()
        h = await env.conductor.start(slow_sleeper)
        with pytest.raises(RunCancelled, match="its deadline passed"):
            await h.result(timeout=30)
        assert env.now() - t0 == DAY  # woken at the deadline, not after the 3-day sleep
        summary = await h.summary()
        assert summary.status == RunStatus.CANCELLED
        assert summary.error_type == "DeadlineExceeded"
        [end] = [e for e in await env.history(h.run_id) if e.kind == "end"]
        assert end.name == "CANCELLED"


async def test_a_deadline_cancels_the_runs_descendants(backend: Backend) -> None:
    async with TestEnvironment(parent, waits_for_go, backend=backend) as env:
        h = await env.conductor.start(parent)
        with pytest.raises(RunCancelled, match="deadline"):
            await h.result(timeout=30)
        await env.run_until_idle()  # the child takes its cancel in
        child = env.conductor.handle(f"{h.run_id}.0")  # its first call's child
        summary = await child.summary()
        assert summary.status == RunStatus.CANCELLED
        assert summary.error is not None and "its deadline passed" in summary.error
        assert summary.error_type == "DeadlineExceeded"
        with pytest.raises(RunCancelled, match="its deadline passed"):
            await child.result(timeout=30)


async def test_start_timeout_overrides_the_workflows_and_a_quick_run_is_unaffected(
    backend: Backend,
) -> None:
    async with TestEnvironment(slow_sleeper, waits_for_go, backend=backend) as env:
        patient = await env.conductor.start(slow_sleeper, timeout=timedelta(days=4))
        assert await patient.result(timeout=30) == "woke"
        quick = await env.conductor.start(waits_for_go, timeout=timedelta(minutes=5))
        await quick.send("go", "in time")
        assert await quick.result(timeout=30) == "in time"
        late = await env.conductor.start("waits_for_go", timeout=60)
        await env.advance(61)
        with pytest.raises(RunCancelled, match="deadline"):
            await late.result(timeout=30)


@workflow()
async def short_sleeper(c: Context) -> str:
    await c.sleep(3)  # under hot_wait: the worker waits in place
    return "woke"


async def test_a_deadline_ends_an_in_place_wait_too() -> None:
    """On the wall clock, with the worker waiting in place (hot_wait): the wait
    is cut at the deadline, not at the end of the sleep."""
    c = Conductor("memory://")
    c.register(short_sleeper)
    async with worker(c, hot_wait=5.0):
        h = await c.start(short_sleeper, timeout=0.2)
        with pytest.raises(RunCancelled, match="deadline"):
            await h.result(timeout=10)
    await c.close()


def test_a_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive duration"):
        workflow(timeout=0)(slow_sleeper.fn)
    with pytest.raises(ValueError, match="positive duration"):
        workflow(timeout=timedelta(seconds=-1))(slow_sleeper.fn)


async def test_a_start_timeout_must_be_positive() -> None:
    async with TestEnvironment(slow_sleeper) as env:
        with pytest.raises(ClientError, match="start\\(timeout=\\) must be a positive duration"):
            await env.conductor.start(slow_sleeper, timeout=0)
