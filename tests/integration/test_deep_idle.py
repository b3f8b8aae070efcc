"""An idle worker on a store whose hints reach every process sleeps until the next
run it serves becomes claimable, instead of polling the store every
``poll_interval``: a run put to sleep by another worker is claimed once it is due,
and the idle worker looked at the store only a few times meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from substantial import Conductor, Context, RunStatus, workflow
from substantial.worker import DEEP_IDLE_AFTER

from ..backends import make_backend, url_for

NAP = 3.0
POLL = 0.1  # without deep idle, the worker would look NAP / POLL = 30 times


@workflow(name="idle.nap")
async def nap(c: Context) -> str:
    await c.sleep(NAP)
    return "rested"


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_an_idle_worker_sleeps_until_the_next_due_run(kind: str, tmp_path: Path) -> None:
    url, _ = url_for(kind, tmp_path)
    async with make_backend(kind, tmp_path, url=url + "&poll_interval=" + str(POLL)) as first:
        async with Conductor(first) as cond:
            cond.register(nap)
            sleeper = cond.run(hot_wait=0, handle_sigterm=False)  # suspends at once
            handle = await cond.start(nap)
            while True:  # the store is the only witness: look until it says so
                if await handle.status() == RunStatus.SUSPENDED:
                    break
                await asyncio.sleep(0.01)
            sleeper.cancel()  # gone: only the store knows when the run is due
            await asyncio.gather(sleeper, return_exceptions=True)

        second = make_backend(kind, tmp_path, url=url + "&poll_interval=" + str(POLL))
        async with second as b, Conductor(b) as idle:
            idle.register(nap)
            worker = idle.run(handle_sigterm=False)
            try:
                assert await idle.handle(handle.run_id).result(timeout=NAP + 10) == "rested"
            finally:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
            looks = b.calls.get("claim_due", 0)  # type: ignore[attr-defined]
    # the first look and DEEP_IDLE_AFTER polls, one look when the run is due, then the
    # polls after it ended until the test stops the worker (a few); polling all along
    # would have looked about NAP / POLL = 30 times
    assert looks <= DEEP_IDLE_AFTER + 7 < NAP / POLL / 2, looks


@workflow(name="idle.busy")
async def busy(c: Context, seconds: float) -> str:
    async def work() -> str:
        await asyncio.sleep(seconds)
        return "worked"

    return await c.save(work)


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_a_worker_whose_limited_queue_is_full_does_not_spin(
    kind: str, tmp_path: Path
) -> None:
    """Runs held back by a queue's concurrency are due already: deep idle must not
    take their due time for a wake-up (it would look at the store in a loop); the
    freed slot's hint, or the poll, brings the next claim."""
    url, _ = url_for(kind, tmp_path)
    poll = f"&poll_interval={POLL}"
    async with make_backend(kind, tmp_path, url=url + poll) as b, Conductor(b) as cond:
        cond.register(busy)
        cond.queue("single", concurrency=1)
        first = await cond.start(busy, {"seconds": 2.0}, queue="single")
        second = await cond.start(busy, {"seconds": 0.0}, queue="single")
        worker = cond.run(queues=["single"], handle_sigterm=False)
        try:
            assert await first.result(timeout=30) == "worked"
            assert await second.result(timeout=30) == "worked"
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        calls = b.calls  # type: ignore[attr-defined]
        looks = calls.get("claim_due", 0) + calls.get("next_due", 0)
    # polling every POLL for 2 s: about 2 * 2 / POLL = 40 looks; a worker that took
    # the held run's past due time for its wake-up would look a thousand times
    assert looks < 100, looks
