"""Workflows the HTTP tests start through the API."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from substantial import Context, workflow


@workflow()
async def double(c: Context, n: int = 1) -> int:
    c.log.info("doubling", n=n)
    value: int = await c.save(lambda: n * 2)
    return value


@workflow()
async def approval(c: Context) -> Any:
    c.log.info("waiting for approval")
    decision = await c.receive("decision")
    return {"decision": decision}


@workflow()
async def family(c: Context, n: int = 1) -> Any:
    first = await c.start_child(double, {"n": n})
    second = await c.start_child(double, {"n": n + 1})
    return [await first.result(), await second.result()]


@workflow()
async def chain(c: Context, n: int = 1) -> Any:
    c.log.info("link", n=n)
    if n > 0:
        await c.continue_using(chain, {"n": n - 1})
    return "end"


undone: list[str] = []
broken_step = {"fail": True}  # a "bug" the test fixes before resuming


@workflow()
async def refundable(c: Context) -> Any:
    await c.save(lambda: "a", compensate_with=lambda: undone.append("a"))
    await c.save(lambda: "b", compensate_with=lambda: undone.append("b"))
    return await c.receive("go")


def _third() -> str:
    if broken_step["fail"]:
        raise KeyError("address")
    return "shipped"


@workflow()
async def shipping(c: Context) -> Any:
    await c.save(lambda: "charged")
    await c.save(lambda: "packed")
    if broken_step["fail"]:
        raise KeyError("address")  # the workflow's own bug, fixed before resume
    return await c.save(_third)


gates: dict[str, asyncio.Event] = {}  # set by the test to let a ``hold`` run end


async def _through(key: str) -> str:
    gate = gates.get(key)  # no gate (a run the fuzzer started): straight through
    if gate is not None:
        await gate.wait()
    return key


@workflow()
async def hold(c: Context, key: str) -> str:
    """Keeps its worker's slot until the test opens the gate ``key``."""
    opened: str = await c.save(functools.partial(_through, key), name="through_the_gate")
    return opened


ALL = (double, approval, family, chain, refundable, shipping, hold)
