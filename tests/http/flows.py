"""Workflows the HTTP tests start through the API."""

from __future__ import annotations

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


ALL = (double, approval, family, chain)
