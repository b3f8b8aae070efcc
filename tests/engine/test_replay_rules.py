"""Replay corner cases: what code sees after a wait is the same live and on replay."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from substantial import Conductor, Context, Retry, RunFailed, RunReverted, workflow
from substantial._journal import decode_record

from .helpers import eventually, worker

effects: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    effects.clear()


@workflow()
async def sees_after_sleep(c: Context) -> list[list[object]]:
    seen: list[object] = []
    c.handle("note", seen.append)
    await c.sleep(0.5)
    right_after = list(seen)  # what plain code observes right after the sleep
    recorded = await c.save(lambda: right_after)  # the first execution's view
    await c.receive("replay")  # a fresh worker replays the run from the start
    return [recorded, right_after]  # right_after: as the replay computed it


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_code_after_a_sleep_sees_the_same_events_on_replay(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(sees_after_sleep)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(sees_after_sleep)
        await eventually(lambda: _has(conductor, h.run_id, "sleep"))
        await h.send("note", 1)  # during the sleep
        await eventually(lambda: _has(conductor, h.run_id, "receive"))
    async with worker(conductor, hot_wait=hot_wait):  # replays the whole log
        await h.send("replay")
        recorded, replayed = await h.result(timeout=10)
    assert recorded == replayed
    log = await _log(conductor, h.run_id)
    kinds = [(r["k"], r.get("p") or r.get("name")) for r in log]
    # the note landed during the sleep: after its arm, before the save
    assert kinds.index(("event", "note")) > kinds.index(("arm", "sleep"))
    assert kinds.index(("event", "note")) < kinds.index(("call", "save"))


async def _log(conductor: Conductor, run_id: str) -> list[dict[str, object]]:
    snap = await conductor.backend.read(run_id)
    assert snap is not None
    return [decode_record(run_id, i, data) for i, data in enumerate(snap.log)]


async def _has(conductor: Conductor, run_id: str, p: str) -> bool:
    return any(r["k"] == "arm" and r.get("p") == p for r in await _log(conductor, run_id))


@workflow()
async def continuing_child(c: Context, n: int) -> int:
    if n < 2:
        await c.continue_using(continuing_child, {"n": n + 1})
    return n * 100


@workflow()
async def parent_of_continuing(c: Context) -> int:
    h = await c.start_child(continuing_child, {"n": 0})
    return int(await h.result())


async def test_a_parent_gets_the_result_of_a_child_that_continued(conductor: Conductor) -> None:
    conductor.register(parent_of_continuing, continuing_child)
    async with worker(conductor):
        h = await conductor.start(parent_of_continuing)
        assert await h.result(timeout=10) == 200


@workflow()
async def revert_after_failed_save(c: Context) -> None:
    await c.save(lambda: effects.append("a"), compensate_with=lambda: effects.append("undo a"))
    with contextlib.suppress(Exception):
        await c.save(
            _boom,
            compensate_with=lambda: effects.append("undo b"),
            retry=None if False else _one_try(),
        )
    await c.revert()


def _boom() -> None:
    raise RuntimeError("b failed")


def _one_try() -> Retry:
    return Retry(max_attempts=1)


async def test_revert_skips_the_compensation_of_a_save_that_failed(conductor: Conductor) -> None:
    conductor.register(revert_after_failed_save)
    async with worker(conductor):
        h = await conductor.start(revert_after_failed_save)
        with pytest.raises(RunReverted):
            await h.result(timeout=10)
    assert effects == ["a", "undo a"]


@workflow()
async def gathers(c: Context) -> object:
    return await asyncio.gather(c.save(lambda: 1), c.save(lambda: 2))


async def test_concurrent_durable_calls_fail_the_run_with_a_clear_error(
    conductor: Conductor,
) -> None:
    conductor.register(gathers)
    async with worker(conductor):
        h = await conductor.start(gathers)
        with pytest.raises(RunFailed, match="one at a time"):
            await h.result(timeout=10)
