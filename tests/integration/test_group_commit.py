"""Group commit end to end: a worker driving many runs commits the records of
several runs in one transaction, and each run still completes once with its own
log. PostgreSQL shows it in the transaction id that wrote each log row (xmin);
SQLite in the statements its connection ran between BEGIN and COMMIT."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from substantial import Conductor, Context, RunStatus, workflow
from substantial.backends.sqlite import SQLiteBackend

from ..backends import POSTGRES_URL, unavailable

RUNS, STEPS = 40, 5


@workflow(name="gc.steps")
async def steps(c: Context, n: int) -> int:
    for i in range(n):

        async def step(i: int = i) -> int:
            return i

        await c.save(step)
    return n


async def run_all(cond: Conductor) -> None:
    cond.register(steps)
    worker = cond.run(concurrency=RUNS, handle_sigterm=False)
    try:
        handles = [await cond.start(steps, {"n": STEPS}) for _ in range(RUNS)]
        assert await asyncio.gather(*(h.result(timeout=60) for h in handles)) == [STEPS] * RUNS
        for h in handles:
            assert await h.status() == RunStatus.COMPLETED
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_postgres_commits_several_runs_records_in_one_transaction() -> None:
    if os.environ.get("CI"):
        import asyncpg
    else:
        asyncpg = pytest.importorskip("asyncpg")
    from substantial.backends.postgres import PostgresBackend

    schema = f"subtest_{uuid.uuid4().hex[:12]}"
    backend = PostgresBackend(POSTGRES_URL, schema=schema)
    try:
        await backend.open()
    except Exception as exc:
        unavailable("postgres", exc)
    try:
        async with Conductor(backend) as cond:
            await run_all(cond)
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            shared = await conn.fetchval(
                f"SELECT count(*) FROM (SELECT xmin::text FROM {schema}.log WHERE pos > 0 "
                "GROUP BY xmin::text HAVING count(DISTINCT run_id) > 1) t"
            )
            rows = await conn.fetchval(f"SELECT count(*) FROM {schema}.log")
        finally:
            await conn.close()
        assert shared >= 1  # some transaction wrote the records of two runs or more
        assert rows == RUNS * (1 + STEPS + 1)  # start, the steps, the end: each once
        assert backend.calls.get("append_batch", 0) >= 1
    finally:
        await backend.drop_everything()
        await backend.close()


@workflow(name="gc.gated")
async def gated(c: Context) -> str:
    async def wait_for_gate() -> str:
        IN_STEP.append(c.run_id)
        await GATE.wait()
        return "through"

    return await c.save(wait_for_gate)


GATE = asyncio.Event()
IN_STEP: list[str] = []  # runs whose step is waiting at the gate


async def test_sqlite_commits_the_appends_that_waited_for_the_lock_in_one_transaction(
    tmp_path: Path,
) -> None:
    """On SQLite a write goes straight to the file when it is free; the appends
    that had to wait (here: another connection holds the write lock) go together."""
    GATE.clear()
    IN_STEP.clear()
    statements: list[str] = []  # every statement the store's connection ran, expanded
    backend = SQLiteBackend(tmp_path / "state.db")
    await backend.open()

    def trace(c: sqlite3.Connection) -> None:
        c.set_trace_callback(statements.append)

    await backend._run(trace, None)  # the connection lives on the store's thread
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    async with Conductor(backend) as cond:
        cond.register(gated)
        worker = cond.run(concurrency=10, handle_sigterm=False)
        try:
            handles = [await cond.start(gated) for _ in range(10)]
            await until(lambda: len(IN_STEP) == len(handles), "every run is in its step")
            other.execute("BEGIN IMMEDIATE")  # hold the file's write lock
            GATE.set()  # every run's step returns: ten appends, and the lock is taken
            await until(lambda: cond.journal.appends_queued >= 2, "appends wait together")
            other.execute("COMMIT")
            assert (
                await asyncio.gather(*(h.result(timeout=30) for h in handles)) == ["through"] * 10
            )
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    other.close()
    await backend.close()
    assert max(len(r) for r in _runs_per_transaction(statements)) > 1
    assert backend.calls.get("append_batch", 0) >= 1


def _runs_per_transaction(statements: list[str]) -> list[set[str]]:
    """The run ids whose log rows each BEGIN..COMMIT of the trace inserted."""
    out: list[set[str]] = []
    current: set[str] | None = None
    for stmt in statements:
        if stmt.startswith("BEGIN"):
            current = set()
        elif stmt.startswith("COMMIT") and current is not None:
            out.append(current)
            current = None
        elif current is not None and stmt.startswith("INSERT INTO log"):
            current.add(stmt.split("VALUES")[1].split(",")[0].strip(" ('"))
    return out


async def until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``cond`` (state inside the store and the event loop; no event to await)."""
    async with asyncio.timeout(timeout):
        while True:
            if cond():
                return
            await asyncio.sleep(0.005)
