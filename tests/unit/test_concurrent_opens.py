"""Several processes opening one fresh store at the same moment all succeed.

Each process opens two backend objects at once (as two Conductors would), released
together by a barrier, and creates a run through each; every run must be there.
Schema creation, migrations, WAL switches and format files race here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from substantial.backends import NewRun, open_backend

from ..backends import url_for

T0 = 1_700_000_000.0
PROCS = 6
ROUNDS = 5


async def _open_and_create(url: str, me: int, barrier: Any) -> str:
    backends = [open_backend(url), open_backend(url)]
    await asyncio.to_thread(barrier.wait)
    try:
        await asyncio.gather(*(b.open() for b in backends))
        for k, b in enumerate(backends):
            new = NewRun(run_id=f"p{me}-{k}", workflow="wf", queue="default",
                         first_record=b"0", created_at=T0, due_at=T0)  # fmt: skip
            if not await b.create_run(new):
                return f"p{me}-{k} was not created"
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        for b in backends:
            await b.close()


def _opener(url: str, me: int, barrier: Any) -> str:
    return asyncio.run(_open_and_create(url, me, barrier))


async def _check_and_drop(url: str) -> set[str]:
    backend = open_backend(url)
    await backend.open()
    try:
        return {r.run_id for r in await backend.list_runs()}
    finally:
        drop = getattr(backend, "drop_everything", None)
        if drop is not None:
            await drop()
        await backend.close()


@pytest.mark.parametrize("kind", ["sqlite", "fs", "redis", "postgres", "s3"])
async def test_processes_opening_a_fresh_store_at_once_all_succeed(
    kind: str, tmp_path: Path
) -> None:
    if kind in ("redis", "postgres"):  # skip locally (fail in CI) without the server
        from ..backends import make_backend

        async with make_backend(kind, tmp_path):
            pass
    ctx = multiprocessing.get_context("spawn")
    expected = {f"p{i}-{k}" for i in range(PROCS) for k in range(2)}
    with ctx.Manager() as manager, ProcessPoolExecutor(PROCS, mp_context=ctx) as pool:
        for round_ in range(ROUNDS):
            url, _ = url_for(kind, tmp_path / f"round{round_}")
            barrier = manager.Barrier(PROCS)
            futures = [pool.submit(_opener, url, i, barrier) for i in range(PROCS)]
            outcomes = [f.result(timeout=120) for f in futures]
            assert outcomes == ["ok"] * PROCS, (round_, outcomes)
            assert await _check_and_drop(url) == expected
