"""Transactional start: on PostgreSQL a run can join the caller's transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from substantial import Conductor, ConfigurationError, Context, RunNotFound, workflow
from substantial.backends import JoinsTransactions

from ..backends import LOCAL, POSTGRES_URL, make_backend
from .helpers import worker


@workflow()
async def welcome(c: Context, user: str) -> str:
    greeting: str = await c.save(lambda: f"hello {user}")
    return greeting


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[Conductor]:
    async with make_backend("postgres", tmp_path) as backend:
        yield Conductor(backend)


async def test_a_run_started_in_a_committed_transaction_exists_and_runs(pg: Conductor) -> None:
    pg.register(welcome)
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        async with conn.transaction():
            h = await pg.start(welcome, {"user": "ada"}, run_id="signup-1", connection=conn)
    finally:
        await conn.close()
    async with worker(pg):
        assert await h.result(timeout=10) == "hello ada"


async def test_a_run_started_in_a_rolled_back_transaction_never_exists(pg: Conductor) -> None:
    pg.register(welcome)
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        tx = conn.transaction()
        await tx.start()
        h = await pg.start(welcome, {"user": "bob"}, run_id="signup-2", connection=conn)
        await tx.rollback()
    finally:
        await conn.close()
    with pytest.raises(RunNotFound):
        await h.status()


@pytest.mark.parametrize("kind", [*LOCAL, "redis"])
async def test_stores_without_the_capability_refuse_a_connection(kind: str, tmp_path: Path) -> None:
    """Joining a transaction is a capability a store declares (JoinsTransactions);
    the others say so instead of failing on an unexpected argument."""
    async with make_backend(kind, tmp_path) as backend:
        assert not isinstance(backend, JoinsTransactions)
        c = Conductor(backend)
        with pytest.raises(ConfigurationError, match="only the PostgreSQL store"):
            await c.start(welcome, {"user": "x"}, connection=object())
        assert await c.search(welcome) == []
        await c.close()
