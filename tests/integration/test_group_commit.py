"""Group commit end to end: a worker driving many runs commits the records of
several runs in one transaction, and each run still completes once with its own
log. PostgreSQL shows it in the transaction id that wrote each log row (xmin);
SQLite in the statements its connection ran between BEGIN and COMMIT."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
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


async def test_sqlite_commits_several_runs_records_in_one_transaction(tmp_path: Path) -> None:
    statements: list[str] = []  # every statement the store's connection ran, expanded
    backend = SQLiteBackend(tmp_path / "state.db")
    await backend.open()

    def trace(c: sqlite3.Connection) -> None:
        c.set_trace_callback(statements.append)

    await backend._run(trace, None)  # the connection lives on the store's thread
    async with Conductor(backend) as cond:
        await run_all(cond)
    await backend.close()

    runs_per_txn: list[set[str]] = []
    current: set[str] | None = None
    for stmt in statements:
        if stmt.startswith("BEGIN"):
            current = set()
        elif stmt.startswith("COMMIT") and current is not None:
            runs_per_txn.append(current)
            current = None
        elif current is not None and stmt.startswith("INSERT INTO log"):
            current.add(stmt.split("VALUES")[1].split(",")[0].strip(" ('"))
    assert max(len(r) for r in runs_per_txn) > 1  # one transaction, several runs' records
    assert backend.calls.get("append_batch", 0) >= 1
