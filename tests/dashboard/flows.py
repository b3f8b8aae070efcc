"""Workflows the dashboard tests start: a retry, a child, a failure, a wait, and
for the recovery actions a bug that can be fixed, compensations, a busy worker."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from datetime import timedelta
from typing import Any

from substantial import Context, Retry, workflow

# Attempts of ``flaky``'s step per key, so the first one fails and the retry
# succeeds (the process is the test's: a worker in the same loop calls it).
tries: Counter[str] = Counter()


def shaky(key: str) -> str:
    tries[key] += 1
    if tries[key] == 1:
        raise ConnectionError("the first try fails")
    return f"ok after {tries[key]}"


@workflow()
async def flaky(c: Context, key: str = "k") -> Any:
    c.log.info("charging", key=key)
    retry = Retry(max_attempts=3, backoff=timedelta(milliseconds=10))
    return await c.save(lambda: shaky(key), name="charge", retry=retry)


@workflow()
async def leaf(c: Context, n: int = 1) -> int:
    value: int = await c.save(lambda: n + 1, name="increment")
    return value


@workflow()
async def parent(c: Context, n: int = 1) -> Any:
    child = await c.start_child(leaf, {"n": n})
    return {"child": await child.result()}


@workflow()
async def grandparent(c: Context) -> Any:
    child = await c.start_child(parent, {"n": 7})
    return await child.result()


@workflow()
async def broken(c: Context) -> Any:
    await c.save(lambda: 1, name="fine")
    raise ValueError("boom: <b>not bold</b>")


@workflow()
async def waiter(c: Context, note: str = "") -> Any:
    await c.sleep(0.01)
    c.log.info("waiting for a decision", note=note)
    decision = await c.receive("decision")
    return {"decision": decision}


@workflow()
async def chatty(c: Context, lines: int = 250) -> int:
    """More timeline entries than one history page (200)."""
    for i in range(lines):
        c.log.info("line", i=i)
    return lines


# Executions of each ``repairable`` step by "key:step"; keys in ``bugged`` fail
# their third step (the bug); the test removes the key to deploy the fix.
ran: Counter[str] = Counter()
bugged: set[str] = set()


def _step(key: str, n: int) -> int:
    ran[f"{key}:{n}"] += 1
    if n == 2 and key in bugged:
        raise KeyError("bug in step 2")
    return n


@workflow()
async def repairable(c: Context, key: str) -> Any:
    """Three steps (seq 0, 1, 2); the third fails while ``key`` is bugged."""
    first = await c.save(lambda: _step(key, 0), name="reserve")
    second = await c.save(lambda: _step(key, 1), name="charge")
    third = await c.save(lambda: _step(key, 2), name="ship", retry=Retry(max_attempts=1))
    return [first, second, third]


undone: dict[str, list[str]] = {}  # compensations run, in order, by key


@workflow()
async def refundable(c: Context, key: str) -> Any:
    """Two compensated saves, then a wait (for "Cancel and revert")."""
    for what in ("hotel", "flight"):
        await c.save(
            functools.partial(str, what),
            name=f"book_{what}",
            compensate_with=functools.partial(_undo, key, what),
        )
    return await c.receive("go")


def _undo(key: str, what: str) -> None:
    undone.setdefault(key, []).append(what)


gates: dict[str, asyncio.Event] = {}  # the test sets one to let a ``hold`` run end


async def _through(key: str) -> str:
    gate = gates.get(key)
    if gate is not None:
        await gate.wait()
    return key


@workflow()
async def hold(c: Context, key: str) -> str:
    """Keeps its worker's slot until the test opens the gate ``key``."""
    opened: str = await c.save(functools.partial(_through, key), name="through_the_gate")
    return opened


ALL = (flaky, leaf, parent, grandparent, broken, waiter, chatty)
RECOVERY = (repairable, refundable, hold)  # served in the recovery tests only
