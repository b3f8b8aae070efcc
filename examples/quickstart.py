"""Quickstart: a workflow that survives its worker being killed.

    python examples/quickstart.py          # the demo (what `make demo` runs)
    python examples/quickstart.py worker   # just a worker, until Ctrl-C

The demo uses the embedded default store (SQLite under ./.substantial/). It
starts a worker in a subprocess, starts a run, kills the worker with SIGKILL
in the middle of the run, starts a fresh worker, and shows that the run
finished with every step executed exactly once.
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
    assert len(steps) == len(set(steps)), "a step ran twice!"
    print("every step ran exactly once.")
    await conductor.close()


async def serve() -> None:
    conductor = Conductor()
    conductor.register(order)
    await conductor.run(hot_wait=5)


if __name__ == "__main__":
    asyncio.run(serve() if sys.argv[1:] == ["worker"] else demo())
