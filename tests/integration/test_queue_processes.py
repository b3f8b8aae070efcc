"""Queue limits across worker processes (DESIGN section 9): the store enforces
them at claim time, so they hold whichever worker claims, and a killed
worker's slots come back when its leases expire.

Each run of ``critical`` writes an effect as it enters its step and one as it
leaves (tests/integration/worker_proc.py): from those timestamps the test
counts how many runs were inside at once. Starts are read from the store
(``started_at``, set by the claim that started a run)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from substantial import RunStatus
from substantial.backends import RunQuery

from ..backends import lease_for
from .conftest import Store
from .procs import Effect, Workers, read_effects, wait_all_terminal, wait_for
from .worker_proc import declare_queues

pytestmark = [
    pytest.mark.crash,
    # the stores' side of every limit is in the conformance suite, on every store;
    # here, the local store and a server store (Redis's Lua mirrors the same gate)
    pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True),
]


def peak_inside(effects: list[Effect], killed: dict[int, float]) -> dict[str, int]:
    """The most runs inside their step at once, overall ("*") and per run id
    prefix (the key): an attempt enters at its step-0 effect and leaves at its
    step-1 effect, or when its process was killed."""
    moves: list[tuple[float, int, str]] = []
    entered: dict[tuple[str, int], float] = {}
    for e in effects:
        if e.step == 0:
            entered[(e.run_id, e.pid)] = e.t
            moves.append((e.t, +1, e.run_id))
        else:
            del entered[(e.run_id, e.pid)]
            moves.append((e.t, -1, e.run_id))
    for (run_id, pid), t in entered.items():  # cut short by a SIGKILL
        moves.append((max(killed[pid], t), -1, run_id))
    inside: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    for _, move, run_id in sorted(moves, key=lambda m: (m[0], m[1])):  # leaving first
        for group in ("*", run_id.split("/", 1)[0]):
            inside[group] += move
            peak[group] = max(peak[group], inside[group])
    return dict(peak)


async def start_critical(
    store: Store, queue: str, run_ids: list[str], *, hold: float, keyed: bool = False
) -> None:
    declare_queues(store.conductor)
    for rid in run_ids:
        key = rid.split("/", 1)[0] if keyed else None
        await store.conductor.start(
            "critical", {"hold": hold}, run_id=rid, queue=queue, concurrency_key=key
        )


async def test_global_concurrency_holds_across_workers_and_a_kill(
    store: Store, workers: Workers
) -> None:
    runs = [f"narrow/{i:03d}" for i in range(100)]
    await start_critical(store, "narrow", runs, hold=0.1)
    lease = lease_for(store.kind, 1.0)
    first, *_ = await workers.start(3, lease=lease, queues=("narrow",))

    async def a_third_done() -> bool:
        done = await store.backend.list_runs(RunQuery(statuses=frozenset({RunStatus.COMPLETED})))
        return len(done) >= 30

    await wait_for(a_third_done, timeout=120, what="a third of the runs")
    killed_at = first.kill()
    await wait_all_terminal(store.backend, runs, timeout=180)
    peak = peak_inside(read_effects(workers.effects), {first.pid: killed_at})
    assert peak["*"] == 5, peak  # reached, never passed
    for rid in runs:
        assert (await store.conductor.handle(rid).status()) == RunStatus.COMPLETED


async def test_per_key_concurrency_holds_across_workers(store: Store, workers: Workers) -> None:
    keys = ["acme", "globex", "initech", "umbrella"]
    runs = [f"{keys[i % 4]}/{i:02d}" for i in range(20)]
    await start_critical(store, "keyed", runs, hold=0.2, keyed=True)
    await workers.start(3, lease=lease_for(store.kind, 1.0), queues=("keyed",))
    await wait_all_terminal(store.backend, runs, timeout=120)
    peak = peak_inside(read_effects(workers.effects), {})
    assert {k: peak[k] for k in keys} == dict.fromkeys(keys, 1), peak
    assert peak["*"] > 1, peak  # the keys never waited for each other


async def test_rate_holds_across_workers_and_is_used(store: Store, workers: Workers) -> None:
    """20 starts a second across 3 workers: at most 20 (+1 for the clocks of
    several machines) in any one-second window, and at least 90 % of the allowed
    starts used over 5 s while runs wait."""
    runs = [f"paced/{i:03d}" for i in range(110)]  # more than 5 s of starts
    await start_critical(store, "paced", runs, hold=0.0)
    await workers.start(3, lease=lease_for(store.kind, 2.0), queues=("paced",))
    await wait_all_terminal(store.backend, runs, timeout=60)
    starts = sorted(
        r.started_at
        for r in await store.backend.list_runs(RunQuery(workflow="critical"))
        if r.started_at is not None
    )
    assert len(starts) == len(runs)
    busiest = max(sum(1 for s in starts[i:] if s < start + 1.0) for i, start in enumerate(starts))
    assert busiest <= 20 + 1, busiest
    first_five_seconds = sum(1 for s in starts if s < starts[0] + 5.0)
    assert first_five_seconds >= 90, first_five_seconds
