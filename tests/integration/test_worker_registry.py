"""The worker registry with real worker processes: live workers are listed, a
SIGKILLed one drops out once its lease has passed, a clean stop leaves at once."""

from __future__ import annotations

import signal
from datetime import datetime

import pytest

from substantial import RunStatus

from .conftest import Store
from .procs import Workers, wait_for

# memory:// is private to its process: worker processes cannot share it
pytestmark = pytest.mark.parametrize(
    "store", ["sqlite", "fs", "redis", "postgres", "s3"], indirect=True
)

LEASE = 1.0


async def listed_pids(store: Store) -> set[int]:
    return {w.pid for w in await store.conductor.workers()}


async def test_workers_lists_live_processes_and_drops_a_killed_one(
    store: Store, workers: Workers
) -> None:
    first, second = await workers.start(2, lease=LEASE)
    both = {first.pid, second.pid}

    async def both_listed() -> bool:
        return await listed_pids(store) == both

    await wait_for(both_listed, timeout=30, what="both workers registered")
    infos = {w.pid: w for w in await store.conductor.workers()}
    assert infos[first.pid].worker_id != infos[second.pid].worker_id
    assert "steps" in infos[first.pid].workflows
    assert infos[first.pid].queues == ("default",)
    assert infos[first.pid].last_beat >= infos[first.pid].started_at
    assert infos[first.pid].started_at.tzinfo is not None

    first.kill()

    async def only_second() -> bool:
        return await listed_pids(store) == {second.pid}

    await wait_for(only_second, timeout=30, what="the killed worker dropped out")
    # The survivor keeps beating: still listed well after its first lease ran out.
    beat = (await store.conductor.workers())[0].last_beat
    await wait_for(lambda: _beat_after(store, beat), timeout=30, what="the survivor beat again")
    assert await listed_pids(store) == {second.pid}

    second.proc.send_signal(signal.SIGTERM)
    second.proc.wait(timeout=30)
    assert await listed_pids(store) == set()  # a clean stop removes its entry at once


async def _beat_after(store: Store, beat: datetime) -> bool:
    found = await store.conductor.workers()
    return bool(found) and found[0].last_beat > beat


async def test_a_pending_run_of_an_unserved_workflow_is_told_apart(
    store: Store, workers: Workers
) -> None:
    [proc] = await workers.start(1, lease=LEASE)

    async def listed() -> bool:
        return await listed_pids(store) == {proc.pid}

    await wait_for(listed, timeout=30, what="the worker registered")
    served = await store.conductor.start("steps", {"n": 0})
    typo = await store.conductor.start("stepz", {"n": 0})
    other_queue = await store.conductor.start("steps", {"n": 0}, queue="elsewhere")
    assert await served.result(timeout=30) == []
    c = store.conductor
    assert await c.served_by(await served.summary())
    for handle in (typo, other_queue):
        summary = await handle.summary()
        assert summary.status == RunStatus.PENDING
        assert not await c.served_by(summary)
