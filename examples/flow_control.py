"""Flow control in one script: a rate-limited queue, one import per customer at
a time, a deadline, a named event, published state and a schedule, on a local
SQLite file.

    python examples/flow_control.py

It prints, for each run, when it started relative to the first, so you can see
the rate limit (4 starts a second) and the per-customer concurrency at work.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime, timedelta
from typing import Any

from substantial import Conductor, Context, RunHandle, RunStatus, workflow

conductor = Conductor("sqlite:///flow-control.db")
conductor.queue("payments", rate=(4, timedelta(seconds=1)))
conductor.queue("imports", concurrency=1)


@workflow()
async def charge(c: Context, order: int) -> str:
    return await c.save(lambda: f"charged order {order}", name="charge")


@workflow(every=timedelta(seconds=1), overlap="skip")
async def heartbeat(c: Context, scheduled_at: datetime) -> str:
    return await c.save(lambda: f"alive at {scheduled_at:%H:%M:%S}", name="beat")


@workflow(timeout=timedelta(minutes=5))
async def import_customer(c: Context, customer: str, batches: int) -> int:
    await c.publish("customer", customer)
    prices = await c.wait_for_event("prices-published", timeout=timedelta(minutes=1))
    for i in range(batches):
        note = f"{customer}: batch {i} at version {prices['version']}"
        await c.save(functools.partial(str, note), name="import")
        await c.publish("progress", {"done": i + 1, "of": batches})
        await c.sleep(0.05)
    return batches


async def main() -> None:
    conductor.register(charge, import_customer, heartbeat)
    async with conductor:
        worker = conductor.run(queues=["default", "payments", "imports"], handle_sigterm=False)
        charges = [await conductor.start(charge, {"order": i}, queue="payments") for i in range(10)]
        imports = [
            await conductor.start(
                import_customer,
                {"customer": customer, "batches": 3},
                queue="imports",
                concurrency_key=customer,
            )
            for customer in ("acme", "acme", "globex")
        ]
        await conductor.emit_event("prices-published", {"version": 7})
        handles: list[RunHandle[Any]] = [*charges, *imports]
        for h in handles:
            await h.result(timeout=60)
        summaries = [await h.summary() for h in handles]
        starts = [s.started_at for s in summaries if s.started_at is not None]
        for h, s in zip(handles, summaries, strict=True):
            assert s.status == RunStatus.COMPLETED and s.started_at is not None
            offset = (s.started_at - min(starts)).total_seconds()
            print(f"{s.workflow:16} started at +{offset:4.1f}s  {await h.states()}")
        [schedule] = conductor.schedules()
        beats = await conductor.search("heartbeat", {"status": {"eq": "COMPLETED"}})
        print(f"heartbeat: {len(beats)} ticks ran, the next at {schedule.next_ticks[0]:%H:%M:%S}")
        worker.cancel()
        await worker


if __name__ == "__main__":
    asyncio.run(main())
