"""A lease another worker takes over is counted, and the stretch's span says so.

The "other worker" is a claim made straight on the store with a clock far
ahead, as if this worker had stalled past its lease; this worker's next
heartbeat finds the run gone and abandons it."""

from __future__ import annotations

import asyncio
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from substantial import Conductor, Context, workflow

from ..engine.helpers import eventually, worker

started: list[asyncio.Event] = []


async def blocks_until_cancelled() -> str:
    started[0].set()
    await asyncio.Event().wait()
    return "never"


@workflow(name="tl.stalls")
async def stalls(c: Context) -> str:
    return await c.save(blocks_until_cancelled)


async def test_a_lease_taken_over_is_counted_and_fails_the_stretch_span(
    conductor: Conductor,
    registry: CollectorRegistry,
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    _, exporter = provider
    started[:] = [asyncio.Event()]
    conductor.register(stalls)
    async with worker(conductor, lease=3):  # renewed every second
        h = await conductor.start(stalls)
        await asyncio.wait_for(started[0].wait(), 20)
        stolen = await conductor.journal.backend.claim_due(
            queue="default",
            workflows=["tl.stalls"],
            limit=1,
            owner="another-worker",
            lease_seconds=600,
            now=time.time() + 3600,  # long after this worker's lease ran out
        )
        assert [c.run_id for c in stolen] == [h.run_id]

        def lost() -> bool:
            return registry.get_sample_value("substantial_leases_lost_total") == 1

        await eventually(lost, timeout=20)
        await eventually(lambda: registry.get_sample_value("substantial_active_runs") == 0)
    assert registry.get_sample_value("substantial_leases_lost_total") == 1
    ended = registry.get_sample_value(
        "substantial_runs_ended_total", {"workflow": "tl.stalls", "status": "COMPLETED"}
    )
    assert ended is None  # nothing ended: the run is the other worker's now
    (run,) = [s for s in exporter.get_finished_spans() if s.name == "substantial.run tl.stalls"]
    assert run.status.status_code == StatusCode.ERROR
    assert "LeaseLost" in (run.status.description or "")
