"""Draw docs/images/dashboard-runs.png and dashboard-run.png from a real server
and Chromium, over a few runs like an operator's::

    PYTHONPATH=src .venv/bin/python -m tests.dashboard.screenshots docs/images
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from playwright.async_api import expect

from substantial import Context, Retry, RunFailed, workflow

from .flows import broken, flaky, parent, waiter
from .harness import chromium, site

failures = {"n": 0}


async def charge_card(amount: int) -> dict[str, Any]:
    await asyncio.sleep(0.15)
    failures["n"] += 1
    if failures["n"] < 3:
        raise ConnectionError("payment gateway timed out")
    return {"charged": amount}


async def reserve() -> str:
    await asyncio.sleep(0.1)
    return "R-1042"


async def ship(reservation: str) -> str:
    await asyncio.sleep(0.2)
    return f"shipped {reservation}"


@workflow()
async def checkout(c: Context, order: str = "A-1", amount: int = 120) -> Any:
    c.log.info("checkout started", order=order)
    reservation = await c.save(reserve, name="reserve_stock")
    retry = Retry(max_attempts=5, backoff=timedelta(milliseconds=100))
    await c.save(lambda: charge_card(amount), name="charge_card", retry=retry)
    await c.sleep(0.2)
    approval = await c.receive("approval")
    c.log.info("approved", by=approval.get("by"))
    shipped = await c.save(lambda: ship(reservation), name="ship")
    return {"order": order, "status": shipped}


async def shoot(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with site(Path(tmp) / "state.db", extra=(checkout,)) as served, chromium() as b:
            c = served.conductor
            for i in range(3):
                await (await c.start(flaky, {"key": f"shot-{i}"})).result(timeout=30)
            await (await c.start(parent, {"n": 2})).result(timeout=30)
            with contextlib.suppress(RunFailed):
                await (await c.start(broken)).result(timeout=30)
            await c.start(waiter, {"note": "awaiting a decision"})
            await c.start("chekout", {"order": "A-1043"})  # mistyped: no worker serves it
            order = await c.start(checkout, {"order": "A-1042", "amount": 120})
            await order.send("approval", {"by": "ops"})
            await order.result(timeout=30)

            page = await b.new_page(viewport={"width": 1200, "height": 760})
            await page.goto(served.url + "/")
            await expect(page.locator("#runs tbody tr")).to_have_count(9)
            await expect(page.locator("#runs .badge.unserved")).to_have_count(1)
            await page.screenshot(path=str(out / "dashboard-runs.png"), full_page=True)
            await page.goto(f"{served.url}/runs/{order.run_id}")
            await expect(page.locator("#s-status")).to_have_text("COMPLETED")
            await expect(page.locator("#logs li")).to_have_count(2)
            await page.screenshot(path=str(out / "dashboard-run.png"), full_page=True)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images")
    target.mkdir(parents=True, exist_ok=True)
    asyncio.run(shoot(target))
