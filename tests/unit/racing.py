"""Processes racing on one store, released together by a barrier: the harness of the
multi-process tests of each store (claims, creates of one id, appends at one position).

Each process opens the store by URL with a client of its own and trusts only what
the store says; the functions here are module-level so ``spawn`` can import them.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from substantial.backends import Backend, NewRun, open_backend
from substantial.errors import LeaseLost

T0 = 1_700_000_000.0
PROCS = 4
RUNS = 200
IDS = 20


def new_run(run_id: str, first: bytes = b"{}", due: float | None = T0) -> NewRun:
    return NewRun(
        run_id=run_id, workflow="wf", queue="default", first_record=first, created_at=T0, due_at=due
    )


async def opened(url: str) -> Backend:
    backend = open_backend(url)
    await backend.open()
    return backend


def in_processes(fn: Any, url: str, timeout: float = 180) -> list[Any]:
    """``fn(url, i, barrier)`` in ``PROCS`` spawned processes; their results in order."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(PROCS)
        with ProcessPoolExecutor(PROCS, mp_context=ctx) as pool:
            futures = [pool.submit(fn, url, i, barrier) for i in range(PROCS)]
            return [f.result(timeout=timeout) for f in futures]


async def _claim_all(url: str, me: int, barrier: Any) -> list[str]:
    backend = await opened(url)
    try:
        await asyncio.to_thread(barrier.wait)  # start claiming together
        got: list[str] = []
        while True:
            claims = await backend.claim_due(
                queue="default", workflows=["wf"], limit=5, owner=f"w{me}",
                lease_seconds=3600, now=T0,
            )  # fmt: skip
            if not claims:
                return got
            got += [c.run_id for c in claims]
    finally:
        await backend.close()


async def _create_all(url: str, me: int, barrier: Any) -> list[bool]:
    backend = await opened(url)
    try:
        await asyncio.to_thread(barrier.wait)
        return [
            await backend.create_run(new_run(f"same-{i}", first=b"%d" % me)) for i in range(IDS)
        ]
    finally:
        await backend.close()


async def _append_all(url: str, me: int, barrier: Any) -> list[bool]:
    """Every process holds the same (current) token and appends at the same lengths:
    a writer that lost its lease and does not know it yet looks exactly like this."""
    backend = await opened(url)
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


def claimer(url: str, me: int, barrier: Any) -> list[str]:
    return asyncio.run(_claim_all(url, me, barrier))


def creator(url: str, me: int, barrier: Any) -> list[bool]:
    return asyncio.run(_create_all(url, me, barrier))


def appender(url: str, me: int, barrier: Any) -> list[bool]:
    return asyncio.run(_append_all(url, me, barrier))


async def each_run_claimed_once(url: str) -> None:
    """RUNS runs, due at several times; every process claims until none is left."""
    backend = await opened(url)
    try:
        for i in range(0, RUNS, 20):
            await asyncio.gather(
                *(backend.create_run(new_run(f"r{j:03}", due=T0 - j % 7)) for j in range(i, i + 20))
            )
        results = in_processes(claimer, url)
        everything = [r for got in results for r in got]
        assert sorted(everything) == sorted(f"r{i:03}" for i in range(RUNS))
        for run_id in ("r000", "r199"):
            run = await backend.get_run(run_id)
            assert run is not None and run.lease_token == 1 and run.lease_owner is not None
    finally:
        await backend.close()


async def each_id_created_once(url: str) -> None:
    """IDS ids, each created by every process at once: one winner, whose log it is."""
    results = in_processes(creator, url)
    backend = await opened(url)
    try:
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
    finally:
        await backend.close()


async def each_position_written_once(url: str) -> None:
    """IDS positions, each appended at by every process with the same token: one
    winner each time, and the log holds exactly the winners' records in order."""
    holder = await opened(url)
    await holder.create_run(new_run("shared", first=b"start"))
    claims = await holder.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=3600, now=T0
    )
    assert [c.token for c in claims] == [1]
    await holder.close()
    results = in_processes(appender, url)
    for i in range(IDS):
        assert sum(r[i] for r in results) == 1, [r[i] for r in results]
    reader = await opened(url)  # holds nothing: it reads what the store has
    try:
        snap = await reader.read("shared")
        assert snap is not None and len(snap.log) == 1 + IDS
        winners = [next(me for me, r in enumerate(results) if r[i]) for i in range(IDS)]
        assert snap.log[1:] == [b"%d-%d" % (w, i) for i, w in enumerate(winners)]
    finally:
        await reader.close()
