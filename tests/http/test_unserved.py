"""``"unserved"``: a PENDING run that no live worker serves says so, in a run's
document and in the runs list; one a live (busy) worker serves does not."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from substantial import RunStatus

from ..engine.helpers import eventually
from . import flows
from .conftest import Served
from .test_routes import start


async def doc_of(api: Served, run_id: str) -> dict[str, Any]:
    r = await api.client.get(f"/api/runs/{run_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def listed(api: Served) -> dict[str, bool]:
    r = await api.client.get("/api/runs")
    assert r.status_code == 200, r.text
    return {s["run_id"]: s["unserved"] for s in r.json()["runs"]}


async def test_a_pending_run_no_worker_serves_is_flagged(api: Served) -> None:
    mistyped = await start(api, "doubel", run_id="mistyped")  # no worker has this name
    elsewhere = await start(api, "double", run_id="elsewhere", queue="nowhere")
    done = await start(api, "double", run_id="done")
    assert await api.conductor.handle(done).result(timeout=30) == 2
    for run_id in (mistyped, elsewhere):
        doc = await doc_of(api, run_id)
        assert (doc["status"], doc["unserved"]) == ("PENDING", True)
    assert (await doc_of(api, done))["unserved"] is False
    assert await listed(api) == {"done": False, "elsewhere": True, "mistyped": True}


async def test_a_pending_run_a_live_worker_serves_is_not_flagged(api: Served) -> None:
    key = uuid.uuid4().hex
    flows.gates[key] = asyncio.Event()
    # A worker of its own on queue "narrow", one run at a time: the first run keeps
    # it busy, so the second stays PENDING while a live worker serves it.
    narrow = api.conductor.run(queues=["narrow"], concurrency=1, handle_sigterm=False)
    try:
        busy = await start(api, "hold", kwargs={"key": key}, run_id="busy", queue="narrow")

        async def running() -> bool:
            return await api.conductor.handle(busy).status() == RunStatus.RUNNING

        await eventually(running, timeout=30)
        queued = await start(api, "hold", kwargs={"key": key}, run_id="queued", queue="narrow")
        doc = await doc_of(api, queued)
        assert (doc["status"], doc["unserved"]) == ("PENDING", False)
        assert await listed(api) == {"queued": False, "busy": False}
    finally:
        narrow.cancel()
        await narrow
    # that worker stopped (and left the registry): nobody serves "narrow" now
    for run_id in ("queued", "busy"):  # the busy one was handed back
        doc = await doc_of(api, run_id)
        assert (doc["status"], doc["unserved"]) == ("PENDING", True)
    del flows.gates[key]
