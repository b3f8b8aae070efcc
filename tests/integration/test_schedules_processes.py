"""A schedule served by several worker processes: each one-second tick starts
exactly one run, which runs its step once, while one of three workers is killed
midway; ticks missed while no worker ran are started on return, as far back as
``catchup`` says and no further."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest

from substantial import RunStatus
from substantial.backends import RunQuery

from .conftest import Store
from .procs import Workers, assert_exactly_once, read_effects, wait_for

pytestmark = [
    pytest.mark.crash,
    # the schedule's logic is the workers'; the store's part (a start is idempotent
    # on its run id, under concurrency) is in the conformance suite for every store
    pytest.mark.parametrize("store", ["sqlite"], indirect=True),
]
TICKS = 12  # one kill at the half: 12 s of ticks show it as well as 30 did


def tick_of(run_id: str) -> float:
    return datetime.fromisoformat(run_id.split("@", 1)[1]).timestamp()


async def ticker_runs(store: Store) -> dict[float, RunStatus]:
    runs = await store.backend.list_runs(RunQuery(workflow="ticker"))
    return {tick_of(r.run_id): r.status for r in runs}


async def test_one_run_per_tick_across_workers_and_catchup_after_a_gap(
    store: Store, workers: Workers
) -> None:
    first, second, third = await workers.start(3, lease=1.0, ticker=0)

    async def ticks_seen(n: int) -> bool:
        return len(await ticker_runs(store)) >= n

    await wait_for(lambda: ticks_seen(TICKS // 2), timeout=60, what="half the ticks")
    first.kill()
    await wait_for(lambda: ticks_seen(TICKS), timeout=60, what="all the ticks")
    for w in (second, third):
        w.kill()
    runs = await ticker_runs(store)
    ticks = sorted(runs)
    assert ticks == [ticks[0] + i for i in range(len(ticks))]  # every second, none twice

    # a gap with no worker, then one back that looks three seconds back
    last = ticks[-1]
    await asyncio.sleep(7)  # the gap is wall-clock time: nothing to wait on instead
    before = time.time()
    [back] = await workers.start(1, lease=1.0, ticker=3)
    after = time.time()
    await wait_for(lambda: ticks_seen(len(ticks) + 4), timeout=30, what="catch-up ticks")
    gap = sorted(t for t in await ticker_runs(store) if t > last)
    assert gap == [gap[0] + i for i in range(len(gap))]  # from the first caught up on
    # the worker started at some R in [before, after] and caught up the ticks in
    # (R - 3, R]: three of them, the oldest in (R - 3, R - 2]; none of the gap before
    assert before - 3 < gap[0] <= after - 2, (before, after, gap)
    assert gap[0] > last + 1  # the gap's first ticks (older than the catch-up) were not started

    async def all_done() -> bool:
        return all(s.is_terminal for s in (await ticker_runs(store)).values())

    await wait_for(all_done, timeout=60, what="every tick's run to end")
    back.kill()
    expected = {r.run_id: 1 for r in await store.backend.list_runs(RunQuery(workflow="ticker"))}
    effects = read_effects(workers.effects)
    assert {e.run_id for e in effects} == set(expected)
    assert_exactly_once(
        workers.effects, expected=expected, killed=workers.killed_pids, context=workers.logs()
    )
