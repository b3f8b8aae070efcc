"""Heartbeats: one renewal per beat for every held lease, loading runs included."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from substantial import Conductor, Context, workflow
from substantial.backends.memory import MemoryBackend

from .helpers import worker

effects: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    effects.clear()


@workflow()
async def holder(c: Context, tag: str) -> str:
    await c.save(lambda: effects.append(tag))
    await c.sleep(1.2)  # waits in place, lease held, over four lease periods of 0.3 s
    return tag


async def test_every_held_lease_is_renewed_in_one_call_per_beat() -> None:
    backend = MemoryBackend()
    async with Conductor(backend) as conductor:
        conductor.register(holder)
        async with worker(conductor, lease=0.3, hot_wait=5.0):
            handles = [await conductor.start(holder, {"tag": f"r{i}"}) for i in range(8)]
            results = await asyncio.gather(*(h.result(timeout=20) for h in handles))
    assert results == [f"r{i}" for i in range(8)]
    assert sorted(effects) == sorted(f"r{i}" for i in range(8))  # no lease was lost
    beats = backend.calls.get("renew", 0)
    # 1.2 s at a beat every 0.1 s: about a dozen calls for all eight runs, not eight each
    assert 6 <= beats <= 30, beats


async def test_a_run_still_loading_keeps_its_lease() -> None:
    backend = MemoryBackend()
    real_read = backend.read
    slow = {"left": 1}

    async def slow_first_read(run_id: str, **kw: Any) -> Any:
        if slow["left"]:  # the session's first read takes three lease periods
            slow["left"] -= 1
            await asyncio.sleep(0.9)
        return await real_read(run_id, **kw)

    backend.read = slow_first_read  # type: ignore[method-assign]
    async with Conductor(backend) as conductor:
        conductor.register(holder)
        async with worker(conductor, lease=0.3, hot_wait=5.0):
            h = await conductor.start(holder, {"tag": "slow"})
            await asyncio.sleep(0.6)  # the first worker is still loading the run
            other = Conductor(backend)  # a second worker looks for expired leases
            other.register(holder)
            async with worker(other, lease=0.3, hot_wait=5.0):
                assert await h.result(timeout=20) == "slow"
            run = await backend.get_run(h.run_id)
    assert effects == ["slow"]
    assert run is not None and run.lease_token == 1  # claimed once: never taken over
