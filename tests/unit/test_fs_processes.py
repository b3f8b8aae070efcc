"""Several processes sharing one FSBackend directory never share a run or a run id."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from substantial.backends import NewRun
from substantial.backends.fs import FSBackend

T0 = 1_700_000_000.0
RUNS = 200
PROCS = 4
IDS = 20


def _new(run_id: str, first: bytes = b"{}", due: float | None = T0) -> NewRun:
    return NewRun(
        run_id=run_id, workflow="wf", queue="default", first_record=first, created_at=T0, due_at=due
    )


async def _claim_all(root: str, owner: str, barrier: Any) -> list[str]:
    backend = FSBackend(root)
    await backend.open()
    try:
        await asyncio.to_thread(barrier.wait)  # start claiming together
        got: list[str] = []
        while True:
            claims = await backend.claim_due(
                queue="default",
                workflows=["wf"],
                limit=5,
                owner=owner,
                lease_seconds=3600,
                now=T0,
            )
            if not claims:
                return got
            got += [c.run_id for c in claims]
    finally:
        await backend.close()


def _claimer(root: str, owner: str, barrier: Any) -> list[str]:
    return asyncio.run(_claim_all(root, owner, barrier))


async def _create_all(root: str, me: int, barrier: Any) -> list[bool]:
    backend = FSBackend(root)
    await backend.open()
    await asyncio.to_thread(barrier.wait)
    return [await backend.create_run(_new(f"same-{i}", first=b"%d" % me)) for i in range(IDS)]


def _creator(root: str, me: int, barrier: Any) -> list[bool]:
    return asyncio.run(_create_all(root, me, barrier))


def _in_processes(fn: Any, root: str) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(PROCS)
        with ProcessPoolExecutor(PROCS, mp_context=ctx) as pool:
            futures = [pool.submit(fn, root, i, barrier) for i in range(PROCS)]
            return [f.result(timeout=60) for f in futures]


async def test_processes_claim_each_run_exactly_once(tmp_path: Path) -> None:
    root = str(tmp_path / "shared")
    backend = FSBackend(root)
    await backend.open()
    for i in range(RUNS):
        await backend.create_run(_new(f"r{i:03}", due=T0 - i % 7))
    results = _in_processes(_claimer, root)
    everything = [r for got in results for r in got]
    assert len(everything) == RUNS
    assert sorted(everything) == sorted(f"r{i:03}" for i in range(RUNS))
    for run_id in ("r000", "r199"):
        run = await backend.get_run(run_id)
        assert run is not None and run.lease_token == 1 and run.lease_owner is not None
    await backend.close()


async def test_processes_creating_one_id_create_it_once(tmp_path: Path) -> None:
    root = str(tmp_path / "shared")
    backend = FSBackend(root)
    await backend.open()
    results = _in_processes(_creator, root)
    for i in range(IDS):
        assert sorted(r[i] for r in results) == [False] * (PROCS - 1) + [True]
        winner = next(me for me, r in enumerate(results) if r[i])
        snap = await backend.read(f"same-{i}")
        assert snap is not None and snap.log == [b"%d" % winner]
    assert len(await backend.list_runs()) == IDS
    assert list((tmp_path / "shared" / "tmp").iterdir()) == []  # losers cleaned up
    claims = await backend.claim_due(
        queue="default", workflows=["wf"], limit=100, owner="w", lease_seconds=60, now=T0
    )
    assert len(claims) == IDS
    await backend.close()
