"""Several processes claiming from one SQLite file never share a run."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from substantial.backends import NewRun
from substantial.backends.sqlite import SQLiteBackend

T0 = 1_700_000_000.0
RUNS = 200
PROCS = 4


async def _claim_all(path: str, owner: str, barrier: Any) -> list[str]:
    backend = SQLiteBackend(path)
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


def _worker(path: str, owner: str, barrier: Any) -> list[str]:
    return asyncio.run(_claim_all(path, owner, barrier))


async def test_processes_claim_each_run_exactly_once(tmp_path: Path) -> None:
    path = str(tmp_path / "shared" / "state.db")
    backend = SQLiteBackend(path)
    await backend.open()
    for i in range(RUNS):
        await backend.create_run(
            NewRun(
                run_id=f"r{i:03}",
                workflow="wf",
                queue="default",
                first_record=b"{}",
                created_at=T0,
                due_at=T0 - i % 7,
            )
        )
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(PROCS)
        with ProcessPoolExecutor(PROCS, mp_context=ctx) as pool:
            futures = [pool.submit(_worker, path, f"w{i}", barrier) for i in range(PROCS)]
            results = [f.result(timeout=60) for f in futures]
    everything = [r for got in results for r in got]
    assert len(everything) == RUNS
    assert sorted(everything) == sorted(f"r{i:03}" for i in range(RUNS))
    for run_id in ("r000", "r199"):
        run = await backend.get_run(run_id)
        assert run is not None and run.lease_token == 1 and run.lease_owner is not None
    await backend.close()
