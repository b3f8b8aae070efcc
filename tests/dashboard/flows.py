"""Workflows the dashboard tests start: a retry, a child, a failure, a wait."""

from __future__ import annotations

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


ALL = (flaky, leaf, parent, grandparent, broken, waiter, chatty)
