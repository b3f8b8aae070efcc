"""Regression tests for engine bugs found by the crash tests (in-process, deterministic)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from substantial import Conductor, Context, RunStatus, workflow
from substantial.backends.memory import MemoryBackend


class BeatDuringNotice(MemoryBackend):
    """The child's end notice to its parent is held in flight until a heartbeat has
    renewed leases, so a beat always lands after the child ended and before its
    notice arrived (the window in which a worker once cancelled the notice)."""

    def __init__(self) -> None:
        super().__init__()
        self.beat = asyncio.Event()
        self.beats_during_notice = 0
        self._holding = False

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        got = await super().renew(leases, lease_seconds=lease_seconds, now=now)
        if self._holding:
            self.beats_during_notice += 1
        self.beat.set()
        return got

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        if b"substantial.child:" in data:
            self._holding = True
            self.beat.clear()
            await self.beat.wait()
            self._holding = False
        return await super().deliver(run_id, data, now=now)


@workflow()
async def kid(c: Context) -> str:
    return "kid done"


@workflow()
async def parent(c: Context) -> Any:
    h = await c.start_child(kid)
    return await h.result()


async def test_parent_hears_of_its_child_even_if_a_heartbeat_lands_after_the_child_ended() -> None:
    backend = BeatDuringNotice()
    c = Conductor(backend)
    c.register(parent, kid)
    try:
        handle = await c.start(parent, run_id="p")
        # the parent waits in place, so the worker holds its lease and keeps beating
        task = c.run(lease=0.3, hot_wait=60, handle_sigterm=False)
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
            assert backend.beats_during_notice >= 1  # the path this test is about
        finally:
            task.cancel()
            await task
    finally:
        await c.close()
