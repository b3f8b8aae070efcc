"""Factories for every store the suites run on, each isolated per test.

Redis and PostgreSQL tests talk to the real servers on loopback
(``SUBSTANTIAL_TEST_REDIS`` / ``SUBSTANTIAL_TEST_POSTGRES`` override the URLs).
They fail, never skip, when the server is missing and ``CI`` is set.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from substantial.backends import Backend

REDIS_URL = os.environ.get("SUBSTANTIAL_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "SUBSTANTIAL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)

LOCAL = ["memory", "sqlite", "fs"]
SERVERS = ["redis", "postgres"]  # servers that notify every process of changes
OBJECT = ["s3"]  # SeaweedFS on loopback (tests/seaweed.py): hints in-process, polling across
ALL = LOCAL + SERVERS + OBJECT

# An S3 request is a network round trip (a few ms alone; under the crash and load
# tests' load on 2 cores, a few hundred ms at p99), and a claim or a renewal takes
# several: a lease on an object store must outlast that, so those tests give S3 at
# least this one (the library's default lease is 30 s). At 4 s, a CI run on a
# loaded machine lost leases of runs whose renewals queued behind their step
# writes (the stale writers were fenced: steps ran again, nothing was corrupted).
S3_MIN_LEASE = 8.0


def lease_for(kind: str, seconds: float) -> float:
    """The lease a crash or load test gives its workers on ``kind``."""
    return max(seconds, S3_MIN_LEASE) if kind == "s3" else seconds


def unavailable(what: str, exc: BaseException) -> None:
    """Skip locally when a server is missing; fail in CI, where it must run."""
    msg = f"{what} unavailable: {exc!r}"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@asynccontextmanager
async def make_backend(
    kind: str, tmp_path: Path, *, url: str | None = None
) -> AsyncIterator[Backend]:
    """A fresh, opened backend of ``kind`` (or opened from ``url``, one of
    :func:`url_for`'s, to share it with another process); removes what it
    created afterwards."""
    backend: Backend
    if url is not None:
        from substantial.backends import open_backend

        backend = open_backend(url)
    elif kind == "memory":
        from substantial.backends.memory import MemoryBackend

        backend = MemoryBackend()
    elif kind == "sqlite":
        from substantial.backends.sqlite import SQLiteBackend

        backend = SQLiteBackend(tmp_path / "state.db")
    elif kind == "fs":
        from substantial.backends.fs import FSBackend

        backend = FSBackend(tmp_path / "logs")
    elif kind == "redis":
        from substantial.backends.redis import RedisBackend

        backend = RedisBackend(REDIS_URL, prefix=f"subtest-{uuid.uuid4().hex[:12]}")
    elif kind == "postgres":
        from substantial.backends.postgres import PostgresBackend

        backend = PostgresBackend(POSTGRES_URL, schema=f"subtest_{uuid.uuid4().hex[:12]}")
    elif kind == "s3":
        from substantial.backends import open_backend

        from . import seaweed

        try:
            backend = open_backend(seaweed.url(f"subtest-{uuid.uuid4().hex[:12]}"))
        except Exception as exc:  # weed is not installed or did not start
            unavailable(kind, exc)
    else:  # pragma: no cover
        raise ValueError(kind)
    try:
        await backend.open()
    except Exception as exc:  # server not running
        unavailable(kind, exc)
    try:
        yield backend
    finally:
        drop = getattr(backend, "drop_everything", None)
        if drop is not None:
            await drop()
        await backend.close()


def url_for(kind: str, tmp_path: Path) -> tuple[str, str]:
    """A store URL usable from another process, plus an isolation suffix."""
    tag = uuid.uuid4().hex[:12]
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/state.db", tag
    if kind == "fs":
        return f"file://{tmp_path}/logs", tag
    if kind == "redis":
        return f"{REDIS_URL}?prefix=subtest-{tag}", tag
    if kind == "postgres":
        return f"{POSTGRES_URL}?schema=subtest_{tag}", tag
    if kind == "s3":
        from . import seaweed

        return seaweed.url(f"subtest-{tag}"), tag
    raise ValueError(kind)
