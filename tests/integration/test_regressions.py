"""Regression tests for engine bugs found by the crash tests (in-process, deterministic)."""

from __future__ import annotations

import asyncio
from typing import Any

from substantial import Conductor, Context, RunStatus, workflow
from substantial.backends.memory import MemoryBackend


class SlowDeliver(MemoryBackend):
    """Deliveries take a network round trip (here a long one, to widen the window)."""

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        await asyncio.sleep(0.5)
        return await super().deliver(run_id, data, now=now)


@workflow()
async def kid(c: Context) -> str:
    return "kid done"


@workflow()
async def parent(c: Context) -> Any:
    h = await c.start_child(kid)
    return await h.result()


async def test_parent_hears_of_its_child_even_if_a_heartbeat_lands_after_the_child_ended() -> None:
    c = Conductor(SlowDeliver())
    c.register(parent, kid)
    try:
        handle = await c.start(parent, run_id="p")
        task = c.run(lease=0.3, hot_wait=0.5, handle_sigterm=False)
        try:
            try:
                result = await handle.result(timeout=5)
            except TimeoutError:
                child = await c.handle("p.0").status()
                raise AssertionError(
                    f"parent {await handle.status()}, child {child}: the notice was lost"
                ) from None
            assert result == "kid done"
            assert await c.handle("p.0").status() == RunStatus.COMPLETED
        finally:
            task.cancel()
            await task
    finally:
        await c.close()
