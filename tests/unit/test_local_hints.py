"""Hints between backend objects on one SQLite file or one directory, in one process.

A second Conductor used as a client in the same process has its own backend object;
its changes must reach the first one's subscribers at once, not at the next poll.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from substantial import Conductor, Context, workflow
from substantial.backends import Backend, NewRun
from substantial.backends.fs import FSBackend
from substantial.backends.sqlite import SQLiteBackend

T0 = 1_700_000_000.0
POLL = 3600.0  # never reached: only a hint can wake a subscriber within the test


def _new(run_id: str) -> NewRun:
    return NewRun(run_id=run_id, workflow="wf", queue="default", first_record=b"0",
                  created_at=T0, due_at=T0)  # fmt: skip


def _pair(kind: str, tmp_path: Path) -> tuple[Backend, Backend]:
    """Two objects on one store, the second through a different spelling of the path."""
    (tmp_path / "sub").mkdir()
    if kind == "sqlite":
        return (
            SQLiteBackend(tmp_path / "state.db", poll_interval=POLL),
            SQLiteBackend(tmp_path / "sub" / ".." / "state.db", poll_interval=POLL),
        )
    return (
        FSBackend(tmp_path / "logs", poll_interval=POLL),
        FSBackend(tmp_path / "sub" / ".." / "logs", poll_interval=POLL),
    )


async def _hinted(stream: AsyncIterator[str], run_id: str) -> None:
    async with asyncio.timeout(10):
        async for item in stream:
            if item == run_id:
                return


@pytest.mark.parametrize("kind", ["sqlite", "fs"])
async def test_a_change_through_one_object_is_hinted_to_the_other(
    kind: str, tmp_path: Path
) -> None:
    a, b = _pair(kind, tmp_path)
    await a.open()
    await b.open()
    stream = a.subscribe()
    try:
        assert await anext(stream) == ""
        assert await b.create_run(_new("r1"))
        await _hinted(stream, "r1")
        await b.deliver("r1", b"x", now=T0)
        await _hinted(stream, "r1")
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await a.close()
        await b.close()


@pytest.mark.parametrize("kind", ["sqlite", "fs"])
async def test_a_subscriber_on_another_thread_is_hinted(kind: str, tmp_path: Path) -> None:
    """A client and a worker may each run their own event loop, in two threads."""
    a, b = _pair(kind, tmp_path)
    ready, got = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    async def listen() -> None:
        await a.open()
        stream = a.subscribe()
        try:
            assert await anext(stream) == ""
            ready.set()
            await _hinted(stream, "r1")
            got.set()
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            await a.close()

    def thread_main() -> None:
        try:
            asyncio.run(listen())
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=thread_main)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 10)
        await b.open()
        await b.create_run(_new("r1"))
        assert await asyncio.to_thread(got.wait, 10), errors
    finally:
        await asyncio.to_thread(thread.join, 15)
        await b.close()
    assert not errors


@workflow()
async def double(c: Context, x: int) -> int:
    return 2 * x


@pytest.mark.parametrize("kind", ["sqlite", "fs"])
async def test_a_second_conductor_as_client_is_served_without_polling(
    kind: str, tmp_path: Path
) -> None:
    """A worker's Conductor and a client's Conductor, each with its own backend object
    on the same store, in one process: the run starts and its result arrives through
    hints alone (both poll intervals are an hour)."""
    a, b = _pair(kind, tmp_path)
    server, client = Conductor(a), Conductor(b)
    server.register(double)
    task = server.run(handle_sigterm=False)
    try:
        handle = await client.start(double, {"x": 21})
        assert await handle.result(timeout=20) == 42
    finally:
        task.cancel()
        await task
        await client.close()
        await server.close()
