"""The worker registry from a worker's side, on every store: registered while it
serves, beating, back after its entry vanished, gone once it stopped."""

from __future__ import annotations

import asyncio
import os

from substantial import Conductor, Context, RunStatus, workflow

from .helpers import eventually, worker


@workflow()
async def noop(c: Context) -> None:
    return None


async def test_a_worker_is_listed_while_it_serves_and_gone_when_it_stops(
    conductor: Conductor,
) -> None:
    conductor.register(noop)
    async with worker(conductor, lease=0.6, queues=["default", "q2"]):

        async def registered() -> bool:
            return len(await conductor.workers()) == 1

        await eventually(registered)
        [w] = await conductor.workers()
        assert w.pid == os.getpid() and w.queues == ("default", "q2")
        assert w.workflows == ("noop",) and w.serves("noop", "q2")
        assert not w.serves("noop", "q3") and not w.serves("other", "default")
        first = w.last_beat

        async def beat_again() -> bool:
            found = await conductor.workers()
            return bool(found) and found[0].last_beat > first

        await eventually(beat_again)
        # The entry vanishes (as after a long outage): the next beat writes it again.
        await conductor.backend.remove_worker(w.worker_id)

        async def back() -> bool:
            return [x.worker_id for x in await conductor.workers()] == [w.worker_id]

        await eventually(back)
        served = await conductor.start(noop)
        await served.result(timeout=10)
        summary = await served.summary()
        assert summary.status == RunStatus.COMPLETED
        assert await conductor.served_by(summary)
    assert await conductor.workers() == []
    assert not await conductor.served_by(summary)


async def test_a_worker_cancelled_at_any_moment_stops_quietly() -> None:
    """Awaiting a cancelled ``run()`` task returns None: cancelled before its first
    step (a task that never began), as it opens the store, and while it serves."""
    c = Conductor("memory://")
    c.register(noop)
    for steps in (0, 1, 3):
        task = c.run(handle_sigterm=False)
        for _ in range(steps):
            await asyncio.sleep(0)
        assert task.cancel()
        assert list(await asyncio.gather(task)) == [None]
    task = c.run(handle_sigterm=False)
    await (await c.start(noop)).result(timeout=10)  # serving
    task.cancel()
    assert list(await asyncio.gather(task)) == [None]
    assert await c.workers() == []
    await c.close()
