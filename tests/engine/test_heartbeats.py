"""Heartbeats: one renewal per beat for every held lease, loading runs included.

Both tests assert what the store recorded (which leases each renewal carried, the
lease tokens, the expiry) rather than how long anything took; what a beat costs
is bench/'s business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from substantial import Conductor, Context, workflow
from substantial.backends import Claim
from substantial.backends.memory import MemoryBackend

from .helpers import eventually, worker

effects: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    effects.clear()


@workflow()
async def holder(c: Context, tag: str) -> str:
    await c.save(lambda: effects.append(tag))
    await c.receive("go")  # waits in place (hot_wait is long), its lease held
    return tag


class RecordingRenewals(MemoryBackend):
    """A memory store that checks each renewal against the leases it has granted."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals: list[set[str]] = []  # run ids carried by each renew call
        self.missed: list[set[str]] = []  # leases held but left out of a renew call

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        held = {
            r.run_id
            for r in await self.list_runs()
            if r.lease_owner is not None and not r.status.is_terminal
        }
        self.renewals.append(set(leases))
        if held - set(leases):
            self.missed.append(held - set(leases))
        return await super().renew(leases, lease_seconds=lease_seconds, now=now)


async def test_every_held_lease_is_renewed_in_one_call_per_beat() -> None:
    backend = RecordingRenewals()
    tags = [f"r{i}" for i in range(8)]
    async with Conductor(backend) as conductor:
        conductor.register(holder)
        async with worker(conductor, lease=0.3, hot_wait=60.0):
            handles = [await conductor.start(holder, {"tag": t}) for t in tags]
            ids = {h.run_id for h in handles}
            # several beats that each carried all eight: well past one lease period
            await eventually(lambda: sum(r == ids for r in backend.renewals) >= 4)
            runs = [await backend.get_run(rid) for rid in ids]
            for h in handles:
                await h.send("go")
            results = await asyncio.gather(*(h.result(timeout=20) for h in handles))
    assert results == tags
    assert sorted(effects) == tags  # each step once: no lease was lost
    assert backend.missed == []  # no renewal ever left out a lease the worker held
    for run in runs:  # each lease was extended past what its claim granted, never lost
        assert run is not None and run.started_at is not None
        assert run.lease_token == 1 and run.lease_expires_at is not None
        assert run.lease_expires_at > run.started_at + 0.3


class SlowFirstRead(MemoryBackend):
    """The first read of a run (the session loading it) waits for the test's gate."""

    def __init__(self) -> None:
        super().__init__()
        self.loading = asyncio.Event()
        self.gate = asyncio.Event()  # (not `release`: that is a store operation)
        self.renewed_at: list[float] = []  # ``now`` of each renewal that carried the run
        self.claims: dict[str, list[list[Claim]]] = {}  # owner -> what each claim took
        self._held = True

    async def read(self, run_id: str, **kw: Any) -> Any:
        if self._held:
            self._held = False
            self.loading.set()
            await self.gate.wait()
        return await super().read(run_id, **kw)

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        if leases:
            self.renewed_at.append(now)
        return await super().renew(leases, lease_seconds=lease_seconds, now=now)

    async def claim_due(self, **kw: Any) -> list[Claim]:
        got = await super().claim_due(**kw)
        self.claims.setdefault(kw["owner"], []).append(got)
        return got


async def test_a_run_still_loading_keeps_its_lease() -> None:
    now = [1_700_000_000.0]  # a clock only the test moves: leases expire when it says
    backend = SlowFirstRead()
    async with Conductor(backend, clock=lambda: now[0]) as conductor:
        conductor.register(holder)
        async with worker(conductor, lease=0.3, hot_wait=60.0):
            h = await conductor.start(holder, {"tag": "slow"})
            await asyncio.wait_for(backend.loading.wait(), 10)  # claimed, now loading
            now[0] += 1.0  # past the claim's lease: only a renewal keeps the run held
            await eventually(lambda: bool(backend.renewed_at) and backend.renewed_at[-1] >= now[0])
            other = Conductor(backend, clock=lambda: now[0])  # looks for expired leases
            other.register(holder)
            async with worker(other, lease=0.3, hot_wait=60.0):
                await eventually(lambda: len(backend.claims) == 2)  # the other one claimed
                backend.gate.set()
                await h.send("go")
                assert await h.result(timeout=20) == "slow"
            run = await backend.get_run(h.run_id)
    assert effects == ["slow"]
    [mine, theirs] = backend.claims.values()
    assert [c.run_id for c in mine[0]] == [h.run_id]
    assert all(c.run_id != h.run_id for batch in theirs for c in batch)  # never taken over
    assert run is not None and run.lease_token == 1  # claimed once
