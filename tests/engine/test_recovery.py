"""Recovery actions on every store: cancel(revert=True), resume, fork."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import pytest

from substantial import (
    ClientError,
    Conductor,
    Context,
    Retry,
    RunCancelled,
    RunFailed,
    RunNotFound,
    RunReverted,
    RunStatus,
    Workflow,
    workflow,
)
from substantial._records import decode_record

from .helpers import eventually, worker

effects: list[str] = []
flaky: set[str] = set()  # compensations that fail their first attempt


@pytest.fixture(autouse=True)
def _clear() -> None:
    effects.clear()
    flaky.clear()


def _effect(name: str) -> None:
    if name in flaky:
        flaky.discard(name)
        raise RuntimeError(f"{name}: transient")
    effects.append(name)


@workflow()
async def trip(c: Context, wait: str, seconds: float) -> str:
    await c.save(lambda: _effect("book hotel"), compensate_with=lambda: _effect("cancel hotel"))
    await c.save(lambda: _effect("book flight"), compensate_with=lambda: _effect("cancel flight"))
    if wait == "sleep":
        await c.sleep(seconds)
    else:
        await c.receive("go", timeout=seconds)
    await c.save(lambda: _effect("pay"))
    return "booked"


async def _suspended(c: Conductor, run_id: str) -> bool:
    return await c.handle(run_id).status() == RunStatus.SUSPENDED and effects == [
        "book hotel",
        "book flight",
    ]


async def _records(c: Conductor, run_id: str) -> list[dict[str, Any]]:
    snap = await c.backend.read(run_id)
    assert snap is not None
    return [decode_record(run_id, i, data) for i, data in enumerate(snap.log)]


WAYS = [  # (wait, seconds, hot_wait): evicted, or kept waiting in place by the worker
    ("sleep", 3600.0, 0.0),
    ("sleep", 20.0, 30.0),
    ("receive", 3600.0, 0.0),
    ("receive", 20.0, 30.0),
]
IDS = ["sleep-evicted", "sleep-in-place", "receive-evicted", "receive-in-place"]


@pytest.mark.parametrize(("wait", "seconds", "hot_wait"), WAYS, ids=IDS)
async def test_cancel_with_revert_runs_the_compensations_newest_first_once(
    conductor: Conductor, wait: str, seconds: float, hot_wait: float
) -> None:
    conductor.register(trip)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(trip, {"wait": wait, "seconds": seconds})
        await eventually(lambda: _suspended(conductor, h.run_id))
        await h.cancel(revert=True)
        with pytest.raises(RunReverted):
            await h.result(timeout=20)
    assert effects == ["book hotel", "book flight", "cancel flight", "cancel hotel"]
    assert await h.status() == RunStatus.REVERTED


@pytest.mark.parametrize(("wait", "seconds", "hot_wait"), WAYS[:2], ids=IDS[:2])
async def test_cancel_without_revert_runs_no_compensation(
    conductor: Conductor, wait: str, seconds: float, hot_wait: float
) -> None:
    conductor.register(trip)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(trip, {"wait": wait, "seconds": seconds})
        await eventually(lambda: _suspended(conductor, h.run_id))
        await h.cancel()
        with pytest.raises(RunCancelled):
            await h.result(timeout=20)
    assert effects == ["book hotel", "book flight"]
    assert await h.status() == RunStatus.CANCELLED


async def test_a_revert_interrupted_by_a_retry_goes_on_from_the_log(conductor: Conductor) -> None:
    """The second compensation fails once: the run suspends for its retry and is
    replayed; the replay stops where the cancel stopped it, and the compensation
    that already ran does not run again."""
    conductor.register(trip)
    async with worker(conductor, hot_wait=0.0):
        h = await conductor.start(trip, {"wait": "sleep", "seconds": 3600.0})
        await eventually(lambda: _suspended(conductor, h.run_id))
        flaky.add("cancel hotel")
        await h.cancel(revert=True)
        with pytest.raises(RunReverted):
            await h.result(timeout=20)
    assert effects == ["book hotel", "book flight", "cancel flight", "cancel hotel"]
    recs = await _records(conductor, h.run_id)
    tail = [(r["k"], r.get("p")) for r in recs if r.get("p") in ("revert", "compensate")]
    assert tail == [
        ("call", "revert"),
        ("call", "compensate"),  # flight
        ("try", "compensate"),  # hotel's failed first attempt, then the replay went on
        ("call", "compensate"),
    ]


async def test_cancel_with_revert_of_a_finished_run_changes_nothing(conductor: Conductor) -> None:
    conductor.register(trip)
    async with worker(conductor):
        h = await conductor.start(trip, {"wait": "sleep", "seconds": 0.0})
        assert await h.result(timeout=20) == "booked"
        await h.cancel(revert=True)
    assert await h.status() == RunStatus.COMPLETED
    assert effects == ["book hotel", "book flight", "pay"]


# -- resume -----------------------------------------------------------------------------

PRINTERS: dict[str, str] = {}
QUICK = Retry(max_attempts=2, backoff=timedelta(milliseconds=10))


def _label(fixed: bool) -> str:
    if not fixed:
        raise KeyError("label printer")
    effects.append("label")
    return "label"


def _order(fixed: bool, *, in_save: bool) -> Workflow[str]:
    """The workflow "order", with a bug in its third step (inside a save, or in the
    workflow's own code right after two saves), or with the fix deployed."""

    async def order(c: Context) -> str:
        await c.save(lambda: _effect("charge"))
        await c.save(lambda: _effect("ship"))
        if in_save:
            await c.save(lambda: _label(fixed), retry=QUICK)
        elif not fixed:
            _ = PRINTERS["label"]  # the bug: a KeyError in the workflow's own code
        else:
            await c.save(lambda: _label(fixed))
        return "done"

    return workflow("order")(order)


@pytest.mark.parametrize("in_save", [False, True], ids=["bug-in-code", "bug-in-save"])
async def test_resume_replays_a_failed_run_with_the_fix(
    conductor: Conductor, in_save: bool
) -> None:
    conductor.register(_order(False, in_save=in_save))
    async with worker(conductor):
        h = await conductor.start("order")
        with pytest.raises(RunFailed):
            await h.result(timeout=20)
    assert effects == ["charge", "ship"]

    fixed = Conductor(conductor.backend)  # the deploy: new code, same store
    fixed.register(_order(True, in_save=in_save))
    try:
        async with worker(fixed):
            await fixed.handle(h.run_id).resume()
            assert await fixed.handle(h.run_id).result(timeout=20) == "done"
        summary = await fixed.handle(h.run_id).summary()
    finally:
        await fixed.close()
    assert effects == ["charge", "ship", "label"]  # steps one and two did not run again
    assert summary.status == RunStatus.COMPLETED
    assert summary.error is None and summary.error_type is None


async def test_resume_of_a_cancelled_run_picks_up_where_it_stopped(conductor: Conductor) -> None:
    conductor.register(trip)
    async with worker(conductor, hot_wait=0.0):
        h = await conductor.start(trip, {"wait": "receive", "seconds": 3600.0})
        await eventually(lambda: _suspended(conductor, h.run_id))
        await h.cancel()
        with pytest.raises(RunCancelled):
            await h.result(timeout=20)
        await h.resume()
        await h.send("go")
        assert await h.result(timeout=20) == "booked"
    assert effects == ["book hotel", "book flight", "pay"]


async def test_resume_refuses_a_run_that_did_not_fail(conductor: Conductor) -> None:
    conductor.register(trip)
    async with worker(conductor):
        done = await conductor.start(trip, {"wait": "sleep", "seconds": 0.0})
        assert await done.result(timeout=20) == "booked"
        waiting = await conductor.start(trip, {"wait": "receive", "seconds": 3600.0})
        await eventually(lambda: _suspended_any(conductor, waiting.run_id))
        for h in (done, waiting):
            with pytest.raises(ClientError, match="only a FAILED or CANCELLED run"):
                await h.resume()
        assert await waiting.status() == RunStatus.SUSPENDED  # untouched
    with pytest.raises(RunNotFound):
        await conductor.handle("no-such-run").resume()


async def _suspended_any(c: Conductor, run_id: str) -> bool:
    return await c.handle(run_id).status() == RunStatus.SUSPENDED


# -- fork -------------------------------------------------------------------------------


@workflow()
async def three(c: Context, tag: str) -> list[str]:
    out = []
    for i in range(3):
        out.append(await c.save(functools.partial(_step, f"{tag}{i}")))
    return out


def _step(name: str) -> str:
    effects.append(name)
    return name


async def test_fork_from_a_step_runs_only_from_there(conductor: Conductor) -> None:
    conductor.register(three)
    async with worker(conductor):
        h = await conductor.start(three, {"tag": "s"})
        assert await h.result(timeout=20) == ["s0", "s1", "s2"]
        before = await _records(conductor, h.run_id)
        forked = await conductor.fork(h.run_id, from_step=2, run_id="the-fork")
        assert forked.run_id == "the-fork"
        assert await forked.result(timeout=20) == ["s0", "s1", "s2"]
    assert effects == ["s0", "s1", "s2", "s2"]  # steps 0 and 1 were not run again
    assert await _records(conductor, h.run_id) == before  # the original is untouched
    assert await h.status() == RunStatus.COMPLETED
    copied = await _records(conductor, "the-fork")
    assert copied[1:3] == before[1:3]  # the first two steps, as recorded
    assert copied[0]["fork"] == {"of": h.run_id, "step": 2}


async def test_fork_keeps_the_events_before_the_step(conductor: Conductor) -> None:
    conductor.register(trip)
    async with worker(conductor):
        h = await conductor.start(trip, {"wait": "receive", "seconds": 3600.0})
        await eventually(lambda: _suspended(conductor, h.run_id))
        await h.send("go")
        assert await h.result(timeout=20) == "booked"
        # step 2 is the receive: forked from step 3 (the payment), the event came along
        forked = await conductor.fork(h.run_id, from_step=3)
        assert await forked.result(timeout=20) == "booked"
    assert effects == ["book hotel", "book flight", "pay", "pay"]


async def test_fork_refuses_a_taken_run_id_and_an_unknown_source(conductor: Conductor) -> None:
    conductor.register(three)
    async with worker(conductor):
        h = await conductor.start(three, {"tag": "s"})
        await h.result(timeout=20)
    with pytest.raises(ClientError, match="exists already"):
        await conductor.fork(h.run_id, from_step=1, run_id=h.run_id)
    with pytest.raises(RunNotFound):
        await conductor.fork("no-such-run", from_step=1)
    with pytest.raises(ClientError, match="from_step"):
        await conductor.fork(h.run_id, from_step=-1)
