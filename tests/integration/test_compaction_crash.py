"""A compacted loop followed by unkeyed calls survives SIGKILLs (guarantee 9).

The ``payroll`` workflow of ``worker_proc``: keyed state drives a loop that
compacts every round, then a receive, a log line and a last save. A worker
is killed inside the loop, its successor is killed while the run waits in the
receive after the loop, and a third one finishes it: each round's effect
happened once and the log stayed bounded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from substantial import RunStatus

from .conftest import Store
from .procs import Workers, assert_exactly_once, read_effects, read_log, wait_for

pytestmark = [
    pytest.mark.crash,
    pytest.mark.parametrize("store", ["sqlite", "fs", "redis", "postgres", "s3"], indirect=True),
]

LEASE = 1.0
MONTHS = 30


async def test_a_compacted_loop_killed_inside_and_after_finishes_once(
    store: Store, workers: Workers, effects: Path
) -> None:
    run_id = "payroll"

    def rounds() -> int:
        return sum(1 for e in read_effects(effects) if e.run_id == run_id)

    [first] = await workers.start(lease=LEASE)
    handle = await store.conductor.start("payroll", {"months": MONTHS}, run_id=run_id)
    await wait_for(lambda: rounds() >= 8, timeout=30, what="8 rounds done")
    first.kill()  # inside the loop
    assert rounds() < MONTHS, "the loop ended before the kill: nothing was tested"

    async def in_receive() -> bool:
        return any(
            r["k"] == "arm" and r.get("p") == "receive"
            for r in await read_log(store.backend, run_id)
        )

    [second] = await workers.start(lease=LEASE)
    await wait_for(in_receive, timeout=60, what="the run waits in the receive after the loop")
    second.kill()  # after the loop, in the receive
    assert await handle.status() not in (RunStatus.COMPLETED, RunStatus.FAILED)

    await workers.start(lease=LEASE)
    await handle.send("go", "paid")
    assert await handle.result(timeout=60) == {"got": "paid", "final": MONTHS}
    assert_exactly_once(
        effects, expected={run_id: MONTHS + 1}, killed=workers.killed_pids, context=workers.logs()
    )
    log = await read_log(store.backend, run_id)
    # start, the last payment, pause and state, the mark, the event, the receive's
    # arm and call, the log line, the last save, the end: whatever MONTHS is
    assert len(log) <= 11, [r["k"] for r in log]
    assert [r.get("p") for r in log if r["k"] in ("call", "log")][-3:] == [
        "receive",
        "log",
        "save",
    ]
