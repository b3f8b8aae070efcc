"""Workflows served by ``substantial worker tests.cli.app:conductor`` in the CLI tests.

``conductor`` uses the store of ``SUBSTANTIAL_BACKEND`` (or ``--backend`` when the
command line gives one); ``tests.cli.app`` as a bare module serves every workflow
below on the ``--backend`` store.
"""

from __future__ import annotations

import os
import time
from typing import Any

from substantial import Conductor, Context, Retry, workflow


@workflow()
async def double(c: Context, n: int = 1) -> int:
    c.log.info("doubling", n=n)
    value: int = await c.save(lambda: n * 2)
    c.log.info("doubled", value=value)
    return value


@workflow()
async def boom(c: Context, message: str = "boom") -> None:
    def fail() -> None:
        raise ValueError(message)

    await c.save(fail, retry=Retry(max_attempts=1))


@workflow()
async def approval(c: Context) -> Any:
    c.log.info("waiting for approval")
    decision = await c.receive("decision")
    c.log.info("decided", decision=decision)
    return {"decision": decision}


def _note(path: str, line: str) -> str:
    """A step's effect: one line appended to the test's file (exactly once, or not)."""
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


@workflow()
async def trip(c: Context, path: str) -> str:
    """Two compensated bookings, then a wait (for cancel --revert)."""
    await c.save(
        lambda: _note(path, "book hotel"), compensate_with=lambda: _note(path, "undo hotel")
    )
    await c.save(
        lambda: _note(path, "book flight"), compensate_with=lambda: _note(path, "undo flight")
    )
    await c.receive("go")
    return "booked"


@workflow()
async def tally(c: Context, path: str, tag: str) -> Any:
    """A step, a wait for the event ``go``, a step: each step notes ``tag`` and the
    pid of the process that ran it, so a test can count how often each step ran.
    Not registered with ``conductor``: served as part of the module ``tests.cli.app``."""
    await c.save(lambda: _note(path, f"before {tag} {os.getpid()}"))
    go = await c.receive("go")
    await c.save(lambda: _note(path, f"after {tag} {os.getpid()}"))
    return go


@workflow()
async def shaky(c: Context, path: str, fixed: str) -> str:
    """Fails in its third step until the file ``fixed`` exists (the deployed fix)."""
    await c.save(lambda: _note(path, "one"))
    await c.save(lambda: _note(path, "two"))

    def three() -> str:
        if not os.path.exists(fixed):
            raise KeyError("bug in step three")
        return _note(path, "three")

    return await c.save(three, retry=Retry(max_attempts=1))


GATE_WAIT = 60.0  # seconds a ``hold`` step waits for its file at most


def _through(gate: str) -> str:
    """Wait for the file ``gate`` (another process makes it; there is no event to
    await across processes), or give up after GATE_WAIT so a worker still stops."""
    deadline = time.monotonic() + GATE_WAIT
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "through"


@workflow()
async def hold(c: Context, gate: str) -> str:
    """Keeps its worker's slot until the file ``gate`` exists."""
    opened: str = await c.save(lambda: _through(gate), name="through_the_gate")
    return opened


conductor = Conductor()
conductor.register(double, boom, approval, trip, shaky, hold)
