"""Store outages, handled the same way at start-up and mid-run (issue 7, item 7).

Each test starts a Redis or PostgreSQL server of its own that it can stop:
a worker started while the store is down waits with backoff and serves once
it is back; ``result(timeout=...)`` waiting through an outage returns instead
of raising; each outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from substantial import Conductor, Context, workflow

from ..backends import SERVERS, unavailable
from ..engine.helpers import worker
from .servers import PostgresServer, RedisServer, make_root

pytestmark = pytest.mark.crash


@workflow()
async def greet(c: Context, name: str = "world") -> str:
    return await c.save(lambda: f"hello {name}")


@workflow()
async def wait_for_go(c: Context) -> str:
    first = await c.save(lambda: "first")
    go = await c.receive("go")
    return f"{first} {go}"


class Server:
    """A server of the test's own, with the URL of a fresh key prefix / schema."""

    def __init__(self, kind: str) -> None:
        root = make_root()
        self.kind = kind
        self.proc: RedisServer | PostgresServer = (
            RedisServer(root) if kind == "redis" else PostgresServer(root)
        )
        tag = uuid.uuid4().hex[:12]
        option = f"prefix=subtest-{tag}" if kind == "redis" else f"schema=subtest_{tag}"
        self.url = f"{self.proc.url}?{option}"

    async def prepare(self) -> None:
        if isinstance(self.proc, PostgresServer):
            await asyncio.to_thread(self.proc.init)

    async def up(self) -> None:
        await asyncio.to_thread(self.proc.start)

    async def down(self) -> None:
        await asyncio.to_thread(self.proc.kill)


@pytest.fixture(params=SERVERS)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    try:
        s = Server(request.param)
        await s.prepare()
    except (OSError, RuntimeError, KeyError) as exc:  # no binaries, no postgres user
        unavailable(f"a {request.param} server of the test's own", exc)
    try:
        yield s
    finally:
        with contextlib.suppress(Exception):
            s.proc.stop()


class Seen(logging.Handler):
    """Sets an event when a log line containing ``text`` is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    msgs = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("substantial") and r.levelno >= logging.INFO
    ]
    return [m for m in msgs if "unreachable" in m], [m for m in msgs if "reachable again" in m]


async def test_a_worker_started_while_the_store_is_down_serves_once_it_is_up(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    served = Conductor(server.url)
    served.register(greet)
    seen = Seen("unreachable")
    logging.getLogger("substantial").addHandler(seen)
    with caplog.at_level(logging.INFO, logger="substantial"):
        async with worker(served) as task:
            async with asyncio.timeout(30):
                await seen.event.wait()  # the worker met the outage and logged it
            assert not task.done()  # waiting, not dead
            await server.up()
            async with Conductor(server.url) as client:
                h = await client.start(greet)
                assert await h.result(timeout=60) == "hello world"
    logging.getLogger("substantial").removeHandler(seen)
    down, back = outage_lines(caplog)
    assert len(down) == 1 and len(back) == 1, (down, back)
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("substantial")]
    await drop(served)


async def test_result_waits_through_an_outage_until_its_own_timeout(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    await server.up()
    served = Conductor(server.url)
    served.register(wait_for_go)
    with caplog.at_level(logging.INFO, logger="substantial"):
        # a short lease: a run whose hand-back met the outage is claimed again once
        # its lease expires (the test waits for that, not for a default 30 s lease)
        async with worker(served, lease=4), Conductor(server.url) as client:
            h = await client.start(wait_for_go)
            waiting = asyncio.create_task(h.result(timeout=120))
            await until_recorded(client, h.run_id)
            await server.down()
            outage = asyncio.create_task(asyncio.sleep(3.0))  # the outage's length
            done, _ = await asyncio.wait({waiting, outage}, return_when="FIRST_COMPLETED")
            assert waiting not in done, "result() gave up during the outage"
            await server.up()
            await h.send("go", "go")
            assert await waiting == "first go"
    down, back = outage_lines(caplog)
    assert len(down) <= 1 and len(back) == len(down), (down, back)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) <= 3, [r.getMessage() for r in noisy]
    await drop(served)


async def until_recorded(c: Conductor, run_id: str) -> None:
    """Until the run's first save is in its log (start record + the save)."""
    async with asyncio.timeout(30):
        while True:
            snap = await c.backend.read(run_id)
            if snap is not None and len(snap.log) >= 2:
                return
            await asyncio.sleep(0.02)


async def drop(c: Conductor) -> None:
    backend: Any = c.backend
    with contextlib.suppress(Exception):
        await backend.drop_everything()
    await c.close()
