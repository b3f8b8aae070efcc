"""Several processes racing on one S3 store (SeaweedFS on loopback): one winner each time.

The race that matters on an object store is between processes with their own
clients and caches, each trusting only what the server's conditional writes say.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from substantial.backends import Backend, NewRun, open_backend
from substantial.errors import LeaseLost

from .. import seaweed
from ..backends import unavailable

T0 = 1_700_000_000.0
PROCS = 4
RUNS = 200
IDS = 20


def _new(run_id: str, first: bytes = b"{}", due: float | None = T0) -> NewRun:
    return NewRun(
        run_id=run_id, workflow="wf", queue="default", first_record=first, created_at=T0, due_at=due
    )


@pytest.fixture
async def url() -> AsyncIterator[str]:
    try:
        url = seaweed.url(f"subtest-{uuid.uuid4().hex[:12]}")
    except Exception as exc:
        unavailable("s3", exc)
    yield url
    backend = open_backend(url)
    await backend.open()
    await backend.drop_everything()  # type: ignore[attr-defined]
    await backend.close()


async def _opened(url: str) -> Backend:
    backend = open_backend(url)
    await backend.open()
    return backend


async def _claim_all(url: str, owner: int, barrier: Any) -> list[str]:
    backend = await _opened(url)
    try:
        await asyncio.to_thread(barrier.wait)  # start claiming together
        got: list[str] = []
        while True:
            claims = await backend.claim_due(
                queue="default", workflows=["wf"], limit=5, owner=f"w{owner}",
                lease_seconds=3600, now=T0,
            )  # fmt: skip
            if not claims:
                return got
            got += [c.run_id for c in claims]
    finally:
        await backend.close()


async def _create_all(url: str, me: int, barrier: Any) -> list[bool]:
    backend = await _opened(url)
    try:
        await asyncio.to_thread(barrier.wait)
        return [await backend.create_run(_new(f"same-{i}", first=b"%d" % me)) for i in range(IDS)]
    finally:
        await backend.close()


async def _append_all(url: str, me: int, barrier: Any) -> list[bool]:
    """Every process holds the same (current) token and appends at the same lengths:
    a writer that lost its lease and does not know yet looks exactly like this."""
    backend = await _opened(url)
    try:
        await asyncio.to_thread(barrier.wait)
        won = []
        for i in range(IDS):
            try:
                await backend.append(
                    "shared", token=1, expected_len=1 + i, records=[b"%d-%d" % (me, i)], now=T0
                )
                won.append(True)
            except LeaseLost:
                won.append(False)
                # learn the log's new end, as a writer told "the log moved" would
                snap = await backend.read("shared")
                assert snap is not None and len(snap.log) >= 2 + i
        return won
    finally:
        await backend.close()


def _claimer(url: str, me: int, barrier: Any) -> list[str]:
    return asyncio.run(_claim_all(url, me, barrier))


def _creator(url: str, me: int, barrier: Any) -> list[bool]:
    return asyncio.run(_create_all(url, me, barrier))


def _appender(url: str, me: int, barrier: Any) -> list[bool]:
    return asyncio.run(_append_all(url, me, barrier))


def _in_processes(fn: Any, url: str) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(PROCS)
        with ProcessPoolExecutor(PROCS, mp_context=ctx) as pool:
            futures = [pool.submit(fn, url, i, barrier) for i in range(PROCS)]
            return [f.result(timeout=180) for f in futures]


async def test_processes_claim_each_run_exactly_once(url: str) -> None:
    backend = await _opened(url)
    for i in range(0, RUNS, 20):
        await asyncio.gather(
            *(backend.create_run(_new(f"r{j:03}", due=T0 - j % 7)) for j in range(i, i + 20))
        )
    results = _in_processes(_claimer, url)
    everything = [r for got in results for r in got]
    assert sorted(everything) == sorted(f"r{i:03}" for i in range(RUNS))
    for run_id in ("r000", "r199"):
        run = await backend.get_run(run_id)
        assert run is not None and run.lease_token == 1 and run.lease_owner is not None
    await backend.close()


async def test_processes_creating_one_id_create_it_once(url: str) -> None:
    results = _in_processes(_creator, url)
    backend = await _opened(url)
    for i in range(IDS):
        assert sorted(r[i] for r in results) == [False] * (PROCS - 1) + [True]
        winner = next(me for me, r in enumerate(results) if r[i])
        snap = await backend.read(f"same-{i}")
        assert snap is not None and snap.log == [b"%d" % winner]
    assert len(await backend.list_runs()) == IDS
    claims = await backend.claim_due(
        queue="default", workflows=["wf"], limit=100, owner="w", lease_seconds=60, now=T0
    )
    assert len(claims) == IDS
    await backend.close()


async def test_processes_appending_at_one_position_have_one_winner_each_time(url: str) -> None:
    backend = await _opened(url)
    await backend.create_run(_new("shared", first=b"start"))
    claims = await backend.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=3600, now=T0
    )
    assert [c.token for c in claims] == [1]
    await backend.close()
    results = _in_processes(_appender, url)
    for i in range(IDS):
        assert sum(r[i] for r in results) == 1, [r[i] for r in results]
    backend = await _opened(url)  # a reader that holds nothing: it lists the log
    snap = await backend.read("shared")
    assert snap is not None and len(snap.log) == 1 + IDS
    winners = [next(me for me, r in enumerate(results) if r[i]) for i in range(IDS)]
    assert snap.log[1:] == [b"%d-%d" % (w, i) for i, w in enumerate(winners)]
    await backend.close()
