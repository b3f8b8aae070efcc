"""Fixtures of the crash and load tests: an isolated store URL, and worker processes on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from substantial import Conductor
from substantial.backends import Backend, open_backend

from ..backends import unavailable, url_for
from .procs import Workers


@dataclass
class Store:
    kind: str
    url: str
    conductor: Conductor  # the test's own client (opened)

    @property
    def backend(self) -> Backend:
        return self.conductor.backend


async def drop_store(url: str) -> None:
    """Delete everything a test created in a server store (redis prefix / pg schema)."""
    backend = open_backend(url)
    drop = getattr(backend, "drop_everything", None)
    if drop is None:
        return
    await backend.open()
    try:
        await drop()
    finally:
        await backend.close()


@pytest.fixture
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """``@pytest.mark.parametrize("store", [...], indirect=True)``: an isolated store."""
    kind: str = request.param
    url, _ = url_for(kind, tmp_path)
    try:
        conductor = Conductor(url)
    except Exception as exc:  # its driver is not installed
        unavailable(kind, exc)
    try:
        await conductor.__aenter__()
    except Exception as exc:  # the server is not running
        await conductor.close()
        unavailable(kind, exc)
    try:
        yield Store(kind, url, conductor)
    finally:
        await conductor.close()
        if kind in ("redis", "postgres", "s3"):
            await drop_store(url)


@pytest.fixture
def effects(tmp_path: Path) -> Path:
    return tmp_path / "effects.log"


@pytest.fixture
def workers(store: Store, tmp_path: Path, effects: Path) -> Iterator[Workers]:
    """Worker processes on ``store``; all killed before the store is cleaned up."""
    ws = Workers(tmp_path, store.url, effects)
    try:
        yield ws
    finally:
        ws.shutdown()
