"""PostgreSQL schema versioning and transactional start (real server on loopback)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest

if os.environ.get("CI"):  # in CI the driver must be there: fail, never skip
    import asyncpg
else:
    asyncpg = pytest.importorskip("asyncpg")

from substantial import RunStatus
from substantial.backends import NewRun, RunUpdate
from substantial.backends.postgres import LATEST_VERSION, PostgresBackend
from substantial.errors import ConfigurationError, SchemaVersionError

from ..backends import POSTGRES_URL, unavailable

T0 = 1_700_000_000.0


def _new(run_id: str) -> NewRun:
    return NewRun(
        run_id=run_id, workflow="wf", queue="default", first_record=b"0", created_at=T0, due_at=T0
    )


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A fresh schema name; dropped afterwards whatever the test did."""
    name = f"subtest_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(POSTGRES_URL)
    except Exception as exc:
        unavailable("postgres", exc)
    try:
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


async def test_migrate_twice_is_idempotent(schema: str) -> None:
    b = PostgresBackend(POSTGRES_URL, schema=schema)
    await b.open()
    await b.open()
    try:
        assert await b.migrate() == LATEST_VERSION
        assert await b.migrate() == LATEST_VERSION
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            versions = await conn.fetch(f'SELECT version FROM "{schema}".schema_version')
        finally:
            await conn.close()
        assert sorted(r["version"] for r in versions) == list(range(1, LATEST_VERSION + 1))
    finally:
        await b.close()
        await b.close()


@pytest.mark.parametrize("version", [1, 3, 6])
async def test_an_older_store_is_upgraded_in_place_with_its_runs(
    schema: str, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    from substantial.backends import _postgres_sql

    with monkeypatch.context() as m:  # what an older release created
        m.setattr(_postgres_sql, "MIGRATIONS", _postgres_sql.MIGRATIONS[:version])
        m.setattr(_postgres_sql, "LATEST_VERSION", version)
        old = PostgresBackend(POSTGRES_URL, schema=schema)
        await old.open()
        try:
            await old.create_run(_new("r1"))
            # claimed as an older release did (today's claim reads today's columns)
            conn = await asyncpg.connect(POSTGRES_URL)
            try:
                token = await conn.fetchval(
                    f"UPDATE \"{schema}\".runs SET status = 'RUNNING', started_at = $1, "
                    "lease_token = lease_token + 1, lease_owner = 'w', "
                    "lease_expires_at = $1::float8 + 30 WHERE run_id = 'r1' RETURNING lease_token",
                    T0,
                )
            finally:
                await conn.close()
            assert await old.append("r1", token=token, expected_len=1, records=[b"1"],
                                    now=T0) == 2  # fmt: skip
        finally:
            await old.close()
    new = PostgresBackend(POSTGRES_URL, schema=schema)
    await new.open()
    try:
        assert await new.migrate() == LATEST_VERSION
        run = await new.get_run("r1")
        assert run is not None and run.log_len == 2 and run.lease_token == token
        assert await new.append("r1", token=token, expected_len=2, records=[b"2"], now=T0) == 3
        snap = await new.read("r1", log_from=-2)
        assert snap is not None and snap.log == [b"1", b"2"] and snap.run.log_len == 3
        assert snap.run.error_type is None  # the column added by migration 4
        update = RunUpdate(status=RunStatus.FAILED, error="e", error_type="KeyError", ended_at=T0)
        await new.append("r1", token=token, expected_len=3, records=[b"x"], update=update,
                         now=T0)  # fmt: skip
        run = await new.get_run("r1")
        assert run is not None and run.error_type == "KeyError"
        assert await new.count_runs() == {("wf", RunStatus.FAILED): 1}  # migration 7's index
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            indexes = await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1",
                                       schema)  # fmt: skip
        finally:
            await conn.close()
        assert "runs_wf_status_idx" in {r["indexname"] for r in indexes}
    finally:
        await new.close()


async def test_concurrent_first_opens_do_not_race(schema: str) -> None:
    backends = [PostgresBackend(POSTGRES_URL, schema=schema, min_size=1) for _ in range(5)]
    await asyncio.gather(*(b.open() for b in backends))
    try:
        assert await backends[0].create_run(_new("r1"))
        assert await backends[4].get_run("r1") is not None
    finally:
        await asyncio.gather(*(b.close() for b in backends))


async def test_newer_schema_version_is_refused(schema: str) -> None:
    b = PostgresBackend(POSTGRES_URL, schema=schema)
    await b.open()
    try:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(
                f'INSERT INTO "{schema}".schema_version (version) VALUES ($1)', LATEST_VERSION + 1
            )
        finally:
            await conn.close()
        with pytest.raises(SchemaVersionError):
            await b.migrate()
    finally:
        await b.close()
    newer = PostgresBackend(POSTGRES_URL, schema=schema)
    with pytest.raises(SchemaVersionError, match="upgrade"):
        await newer.open()
    await newer.close()


async def test_transactional_create_run_follows_the_callers_transaction(schema: str) -> None:
    b = PostgresBackend(POSTGRES_URL, schema=schema)
    await b.open()
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                assert await b.create_run_in(_new("rolled-back"), conn)
                raise RuntimeError("abort the business transaction")
        assert await b.get_run("rolled-back") is None
        assert await b.read("rolled-back") is None

        async with conn.transaction():
            assert await b.create_run_in(_new("committed"), conn)
            assert await b.get_run("committed") is None  # not visible before commit
        snap = await b.read("committed")
        assert snap is not None and snap.log == [b"0"]
    finally:
        await conn.close()
        await b.close()


async def test_hint_of_a_transactional_start_is_sent_on_commit(schema: str) -> None:
    b = PostgresBackend(POSTGRES_URL, schema=schema)
    await b.open()
    stream = b.subscribe()
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        assert await asyncio.wait_for(stream.__anext__(), 10) == ""  # listening
        waiter = asyncio.ensure_future(stream.__anext__())
        async with conn.transaction():
            await b.create_run_in(_new("r1"), conn)
            await asyncio.sleep(0.2)
            assert not waiter.done()
        assert await asyncio.wait_for(waiter, 5) == "r1"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await conn.close()
        await b.close()


@pytest.mark.parametrize("bad", ["", "1abc", "a-b", 'x"; DROP TABLE y; --', "a" * 58, "a.b"])
def test_schema_name_is_validated(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        PostgresBackend(POSTGRES_URL, schema=bad)
