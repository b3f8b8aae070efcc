"""Store URLs: mistakes are ConfigurationErrors that say what is wrong, never silent."""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from substantial import Conductor
from substantial.backends import NewRun, open_backend
from substantial.backends.fs import FSBackend
from substantial.backends.memory import MemoryBackend
from substantial.backends.sqlite import SQLiteBackend
from substantial.errors import ConfigurationError

from ..backends import POSTGRES_URL, REDIS_URL, unavailable

T0 = 1_700_000_000.0


def _driver(name: str) -> Any:
    """The driver module; a missing one skips locally and fails in CI."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def test_none_means_the_default_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBSTANTIAL_BACKEND", raising=False)
    backend = open_backend(None)
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == Path(".substantial/state.db")
    monkeypatch.setenv("SUBSTANTIAL_BACKEND", "memory://")
    assert isinstance(open_backend(None), MemoryBackend)


@pytest.mark.parametrize("url", ["", "   "])
def test_an_empty_url_is_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBSTANTIAL_BACKEND", "memory://")  # never a fallback
    with pytest.raises(ConfigurationError, match="empty"):
        open_backend(url)
    with pytest.raises(ConfigurationError, match="empty"):
        Conductor(url)


@pytest.mark.parametrize(
    ("url", "wrong", "known"),
    [
        ("memory://?prefix=x", "prefix", "none"),
        ("sqlite:///state.db?poll=1", "poll", "busy_timeout, poll_interval"),
        ("file:///tmp/x?fsnyc=0", "fsnyc", "fsync, poll_interval"),
        ("redis://127.0.0.1:6379/0?prefx=app", "prefx", "prefix"),
        ("redis://127.0.0.1/0?ssl_certfile=c.pem", "ssl_certfile", "socket_timeout"),
        ("rediss://127.0.0.1/0?prefx=app", "prefx", "ssl_certfile"),
        ("postgresql://u@127.0.0.1/db?schem=x", "schem", "schema"),
        ("postgres://u@127.0.0.1/db?sslmod=require", "sslmod", "sslmode"),
    ],
)
def test_an_unknown_option_is_named_with_the_known_ones(url: str, wrong: str, known: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_backend(url)
    message = str(info.value)
    assert f"{wrong!r}" in message
    assert known in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cr3t-pw@127.0.0.1:6379/0?prefx=app",
        "redis://127.0.0.1:6379/0?password=s3cr3t-pw&prefx=app",
        "postgresql://u:s3cr3t-pw@127.0.0.1/db?schem=x",
        "postgresql://u:s3cr3t-pw@127.0.0.1/db?poll_interval=s3cr3t-pw",
        "sqlite:///s.db?poll_interval=s3cr3t-pw",
    ],
)
def test_errors_never_show_a_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_backend(url)
    assert "s3cr3t-pw" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///s.db?poll_interval=0",
        "sqlite:///s.db?busy_timeout=-1",
        "file:///tmp/x?fsync=maybe",
        "redis://127.0.0.1/0?max_connections=many",
        "postgresql://u@127.0.0.1/db?min_size=-1",
    ],
)
def test_a_bad_value_names_its_option(url: str) -> None:
    name = url.rpartition("?")[2].partition("=")[0]
    with pytest.raises(ConfigurationError, match=f"'{name}' has an invalid value"):
        open_backend(url)


def test_local_options_reach_the_store(tmp_path: Path) -> None:
    sqlite = open_backend(f"sqlite:///{tmp_path}/s.db?poll_interval=0.25&busy_timeout=3")
    assert isinstance(sqlite, SQLiteBackend) and sqlite.poll_interval == 0.25
    files = open_backend(f"file://{tmp_path}/logs?fsync=off&poll_interval=2")
    assert isinstance(files, FSBackend) and files.poll_interval == 2.0


def _new(run_id: str) -> NewRun:
    return NewRun(run_id=run_id, workflow="wf", queue="default", first_record=b"0",
                  created_at=T0, due_at=T0)  # fmt: skip


async def test_redis_options_reach_the_store_and_the_driver() -> None:
    redis = _driver("redis.asyncio")
    prefix = f"subtest-{uuid.uuid4().hex[:12]}"
    url = f"{REDIS_URL}?prefix={prefix}&socket_timeout=7&client_name=subtest&max_connections=4"
    backend = open_backend(url)
    try:
        await backend.open()
    except Exception as exc:
        unavailable("redis", exc)
    raw = redis.from_url(REDIS_URL)
    try:
        await backend.create_run(_new("r1"))
        assert await raw.exists("{" + prefix + "}:run:r1") == 1  # our option: the prefix
        names = [c.get("name") for c in await raw.client_list()]
        assert "subtest" in names  # a driver option, passed through
    finally:
        await raw.aclose()
        drop = getattr(backend, "drop_everything", None)
        if drop is not None:
            await drop()
        await backend.close()


async def test_postgres_options_reach_the_store_and_the_driver() -> None:
    asyncpg = _driver("asyncpg")
    schema = f"subtest_{uuid.uuid4().hex[:12]}"
    app = f"subtest-{uuid.uuid4().hex[:8]}"
    url = (
        f"{POSTGRES_URL}?schema={schema}&sslmode=disable&connect_timeout=5"
        f"&application_name={app}&max_size=3"
    )
    backend = open_backend(url)
    try:
        await backend.open()
    except Exception as exc:
        unavailable("postgres", exc)
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await backend.create_run(_new("r1"))
        found = await conn.fetchval(f'SELECT count(*) FROM "{schema}".runs')
        assert found == 1  # our option: the schema
        apps = await conn.fetch("SELECT 1 FROM pg_stat_activity WHERE application_name = $1", app)
        assert apps  # our option, given to the driver's connections
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        await backend.close()
