"""Quickstart: a workflow that survives its worker being killed.

    python examples/quickstart.py          # the demo (what `make demo` runs)
    python examples/quickstart.py worker   # just a worker, until Ctrl-C

The demo uses the embedded default store (SQLite under ./.substantial/). It
starts a worker in a subprocess, starts a run, kills the worker with SIGKILL
in the middle of the run, starts a fresh worker, and checks what the guarantee
promises: every step whose result was recorded ran exactly once. The one step
that may run twice is the step in flight at the kill (its function ran, its
result was not recorded yet), which is why real steps should be idempotent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

from substantial import Conductor, Context, workflow

EFFECTS = Path(".substantial/effects.log")


def side_effect(run_id: str, step: str) -> str:
    """A stand-in for charging a card or sending an email: visible, not idempotent."""
    EFFECTS.parent.mkdir(parents=True, exist_ok=True)
    with EFFECTS.open("a") as f:
        f.write(f"{run_id} {step}\n")
    return step


@workflow()
async def order(c: Context, item: str, steps: int = 6) -> str:
    done = []
    for i in range(steps):
        done.append(await c.save(lambda i=i: side_effect(c.run_id, f"step-{i}")))
        await c.sleep(timedelta(milliseconds=400))  # a durable timer between steps
    c.log.info("order complete", item=item)
    return f"{item}: {len(done)} steps"


def effects_of(run_id: str) -> list[str]:
    lines = EFFECTS.read_text().splitlines()
    return [ln.split()[1] for ln in lines if ln.startswith(run_id)]


def spawn_worker() -> subprocess.Popen[bytes]:
    env = {**os.environ, "SUBSTANTIAL_LEASE_SECONDS": "2"}
    return subprocess.Popen([sys.executable, __file__, "worker"], env=env)


async def demo() -> None:
    conductor = Conductor()  # SQLite under ./.substantial/ (or $SUBSTANTIAL_BACKEND)
    run_id = f"order-{uuid.uuid4().hex[:8]}"
    handle = await conductor.start(order, {"item": "book"}, run_id=run_id)
    print(f"started run {run_id}")

    first = spawn_worker()
    await asyncio.sleep(1.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = effects_of(run_id)
    print(f"killed the worker (SIGKILL) after {len(done)} steps; status: {await handle.status()}")

    second = spawn_worker()
    try:
        result = await handle.result(timeout=60)
    finally:
        second.terminate()
        second.wait()
    steps = effects_of(run_id)
    print(f"a new worker finished it: {result!r}")
    print(f"steps executed: {steps}")
    check_guarantee(done, steps[len(done) :])
    await conductor.close()


def check_guarantee(before: list[str], after: list[str]) -> None:
    """Steps run by the killed worker (``before``) and by the new one (``after``).

    A step runs again only if its worker died before recording its result, and
    the steps of one run are sequential, so only the last step the killed worker
    started can have been in flight: it alone may appear twice, and then it is
    the first thing the new worker did."""
    steps = before + after
    assert sorted(set(steps)) == sorted(f"step-{i}" for i in range(6)), steps
    in_flight = before[-1] if before else None
    again = sorted({s for s in steps if steps.count(s) > 1})
    assert again in ([], [in_flight]), f"a recorded step ran twice: {again}"
    if again:  # then in_flight is that step: twice, and again first after the restart
        assert steps.count(again[0]) == 2 and after[0] == again[0], steps
    print("every recorded step ran exactly once.")
    if again:
        print(
            f"{in_flight} ran twice: the worker was killed while it was in flight (run, "
            "but its result not yet recorded), so the new worker ran it again. The "
            "guarantee allows this for the step in flight; make such steps idempotent."
        )
    else:
        print("no step was in flight when the worker was killed, so none ran twice.")


async def serve() -> None:
    conductor = Conductor()
    conductor.register(order)
    await conductor.run(hot_wait=5)


if __name__ == "__main__":
    asyncio.run(serve() if sys.argv[1:] == ["worker"] else demo())
