"""Workers SIGKILLed mid-run on the embedded stores: runs finish, no step runs twice.

Real worker processes (``tests/integration/worker_proc.py``) share one SQLite
file or one directory; every step's side effect is a line in an effects file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from substantial import RunStatus

from ..backends import lease_for
from .conftest import Store
from .procs import (
    Workers,
    assert_exactly_once,
    check_log_once,
    read_effects,
    wait_all_terminal,
    wait_for,
)

pytestmark = [
    pytest.mark.crash,
    pytest.mark.parametrize("store", ["sqlite", "fs", "s3"], indirect=True),
]

LEASE = 1.0


async def test_killed_worker_mid_workflow_is_finished_by_a_new_one(
    store: Store, workers: Workers, effects: Path
) -> None:
    n = 20
    [first] = await workers.start(lease=lease_for(store.kind, LEASE))
    # hold: the worker stays 0.1 s in each step's function after its effect, so the
    # kill below (as soon as the 6th effect shows) most likely lands inside step 5
    kwargs = {"n": n, "sleep": 0.05, "hold": 0.1}
    handle = await store.conductor.start("steps", kwargs, run_id="crash-20")

    def progress() -> int:
        return sum(1 for e in read_effects(effects) if e.run_id == "crash-20")

    await wait_for(lambda: progress() >= 6, timeout=30, what="6 steps done")
    first.kill()
    before = read_effects(effects)
    assert len(before) < n, "the run finished before the kill: nothing was tested"
    assert await handle.status() not in (RunStatus.COMPLETED, RunStatus.FAILED)

    [second] = await workers.start(lease=lease_for(store.kind, LEASE))
    assert await handle.result(timeout=60) == list(range(n))

    report = assert_exactly_once(
        effects, expected={"crash-20": n}, killed=workers.killed_pids, context=workers.logs()
    )
    after = read_effects(effects)
    assert {e.pid for e in after[len(before) :]} == {second.pid}, "the new worker finished it"
    assert len(after) - n <= 1, report.excused  # at most the step the kill interrupted
    print(f"re-executed after the kill: {report.excused or 'nothing'}")
    assert await check_log_once(store.backend, "crash-20", n) == []


async def test_two_workers_one_killed_and_replaced(
    store: Store, workers: Workers, effects: Path
) -> None:
    # lease 2 s, not 1: with ~50 runs per worker a heartbeat pass can take most of a
    # second on this store (see test_many_workers.test_many_runs_short_lease)
    runs, n, lease = 100, 5, lease_for(store.kind, 2.0)
    a, b = await workers.start(2, lease=lease)
    ids = [f"r{i:03}" for i in range(runs)]
    c = store.conductor
    await asyncio.gather(*(c.start("steps", {"n": n, "sleep": 0.05}, run_id=rid) for rid in ids))

    def progress() -> int:
        return len(read_effects(effects))

    await wait_for(lambda: progress() >= runs * n // 4, timeout=60, what="a quarter done")
    a.kill()
    orphans = [
        r.run_id
        for r in await store.backend.list_runs()
        if not r.status.is_terminal and r.lease_owner and f":{a.pid}:" in r.lease_owner
    ]
    assert orphans, "the killed worker held no run: nothing was tested"
    await workers.start(1, lease=lease)

    done = await wait_all_terminal(store.backend, ids, timeout=90, on_timeout=workers.logs)
    bad = {
        rid: (r.status, r.result, r.error)
        for rid, r in done.items()
        if r.status != RunStatus.COMPLETED or r.result != list(range(n))
    }
    assert not bad, bad
    assert_exactly_once(
        effects,
        expected=dict.fromkeys(ids, n),
        killed=workers.killed_pids,
        context=workers.logs(),
    )
    problems = [p for rid in ids for p in await check_log_once(store.backend, rid, n)]
    assert problems == []
    assert b.alive()


async def test_killed_worker_mid_compacted_loop_is_finished_by_a_new_one(
    store: Store, workers: Workers, effects: Path
) -> None:
    await compacted_loop_survives_a_kill(store, workers, effects)


async def compacted_loop_survives_a_kill(store: Store, workers: Workers, effects: Path) -> None:
    """Shared with the Redis and PostgreSQL suite (test_many_workers)."""
    n = 30
    [first] = await workers.start(lease=lease_for(store.kind, LEASE))
    handle = await store.conductor.start("compacting", {"n": n, "sleep": 0.03}, run_id="cmp")

    def progress() -> int:
        return sum(1 for e in read_effects(effects) if e.run_id == "cmp")

    await wait_for(lambda: progress() >= 8, timeout=30, what="8 rounds done")
    first.kill()
    assert progress() < n, "the run finished before the kill: nothing was tested"

    await workers.start(lease=lease_for(store.kind, LEASE))
    assert await handle.result(timeout=60) == n
    assert_exactly_once(
        effects, expected={"cmp": n}, killed=workers.killed_pids, context=workers.logs()
    )
    snap = await store.backend.read("cmp")
    assert snap is not None and len(snap.log) <= 6  # start, last state, last pause(s), mark, end
