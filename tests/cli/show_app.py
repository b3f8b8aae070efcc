"""Workflows for the ``show`` tests: ``substantial worker tests.cli.show_app:conductor``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from substantial import Conductor, Context, Retry, workflow

_failures = {"left": 1}  # per worker process: the first charge fails, the retry succeeds


def fetch_price() -> int:
    return 7


def charge_card() -> str:
    if _failures["left"]:
        _failures["left"] -= 1
        raise ConnectionError("card service unavailable")
    return "charged"


@workflow()
async def parcel(c: Context, n: int = 1) -> int:
    return n + 1


@workflow()
async def checkout(c: Context) -> dict[str, Any]:
    price = await c.save(fetch_price)
    paid = await c.save(charge_card, retry=Retry(backoff=timedelta(milliseconds=10)))
    c.log.info("paid", price=price)
    await c.sleep(0.01)
    child = await c.start_child(parcel, {"n": price})
    shipped = await c.receive("ship")
    return {"paid": paid, "parcel": await child.result(), "shipped": shipped}


@workflow()
async def crash(c: Context) -> None:
    await c.save(fetch_price)
    raise LookupError("no such sku")


conductor = Conductor()
conductor.register(checkout, parcel, crash)
