"""A real uvicorn server on 127.0.0.1 serving the API over a Conductor, in the
test's event loop, with a worker running in the same loop; httpx talks to it.

The listening socket is bound (port 0: a free one) and listening before the
server starts, so no port can be taken in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from substantial import Conductor
from substantial.http import create_app, server_config

from ..backends import POSTGRES_URL, unavailable
from .flows import ALL


@dataclass
class Served:
    conductor: Conductor
    url: str
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:  # uvicorn has no event to await; it sets a flag
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def serving(conductor: Conductor, *, token: str | None = None) -> AsyncIterator[Served]:
    conductor.register(*ALL)
    worker = conductor.run(handle_sigterm=False)
    try:
        async with (
            running(create_app(conductor, token=token)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            yield Served(conductor=conductor, url=url, client=client)
    finally:
        worker.cancel()
        await worker
        await conductor.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(Conductor(f"sqlite:///{tmp_path}/state.db")) as served:
        yield served


@pytest.fixture(params=["sqlite", "postgres"])
async def any_conductor(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Conductor]:
    """A Conductor on SQLite, then on a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield Conductor(f"sqlite:///{tmp_path}/state.db")
        return
    from substantial.backends.postgres import PostgresBackend

    backend = PostgresBackend(POSTGRES_URL, schema=f"subtest_{uuid.uuid4().hex[:12]}")
    try:
        await backend.open()
    except Exception as exc:
        unavailable("postgres", exc)
    try:
        yield Conductor(backend)
    finally:
        await backend.drop_everything()
        await backend.close()


@pytest.fixture
async def any_api(any_conductor: Conductor) -> AsyncIterator[Served]:
    """The server over SQLite, then over PostgreSQL."""
    async with serving(any_conductor) as served:
        yield served
