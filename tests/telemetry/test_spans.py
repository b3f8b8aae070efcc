"""OpenTelemetry spans, collected with the SDK's in-memory exporter.

A run's stretches each get a ``substantial.run`` span parented to the span of
the code that called ``start`` (its W3C context is stored with the run); each
executed attempt of a save gets a ``substantial.step`` span under the stretch
that ran it, with its attempt number; a call a replay answers from the log
gets none (``hot_wait=0`` evicts the run at its sleep and at its retry's
backoff, so later stretches replay the earlier steps)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, StatusCode
from prometheus_client import CollectorRegistry

from substantial import Conductor, Context, Retry, RunFailed, telemetry, workflow

from .helpers import serving

Tracing = tuple[TracerProvider, InMemorySpanExporter]
calls: dict[str, int] = {}


async def reserve() -> str:
    calls["reserve"] = calls.get("reserve", 0) + 1
    return "seat"


async def charge() -> int:
    calls["charge"] = calls.get("charge", 0) + 1
    if calls["charge"] == 1:
        raise ConnectionError("gateway hiccup")
    return 42


@workflow(name="ts.booking")
async def booking(c: Context) -> list[Any]:
    seat = await c.save(reserve)
    await c.sleep(0.05)
    paid = await c.save(charge, retry=Retry(max_attempts=3, backoff=timedelta(milliseconds=20)))
    when = await c.save(lambda: "now")
    return [seat, paid, when]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def ctx(span: ReadableSpan) -> Any:
    assert span.context is not None
    return span.context


async def test_one_step_span_per_executed_attempt_none_on_replay_under_the_callers_trace(
    conductor: Conductor, provider: Tracing, registry: CollectorRegistry
) -> None:
    tp, exporter = provider
    calls.clear()
    conductor.register(booking)
    async with serving(conductor, registry, hot_wait=0):
        with tp.get_tracer("test").start_as_current_span("caller"):
            h = await conductor.start(booking)
        result = await h.result(timeout=20)
    assert result[:2] == ["seat", 42]
    assert calls == {"reserve": 1, "charge": 2}
    spans = exporter.get_finished_spans()
    (caller,) = [s for s in spans if s.name == "caller"]
    runs = [s for s in spans if s.name == "substantial.run ts.booking"]
    steps = [s for s in spans if s.name.startswith("substantial.step ")]
    steps.sort(key=lambda s: s.start_time or 0)
    # stretches: up to the sleep; up to the retry's backoff; to the end
    assert len(runs) == 3
    for run in runs:
        assert run.parent is not None and run.parent.span_id == ctx(caller).span_id
        assert ctx(run).trace_id == ctx(caller).trace_id
        assert attrs(run)["substantial.run_id"] == h.run_id
        assert attrs(run)["substantial.workflow"] == "ts.booking"
    assert [attrs(r).get("substantial.status") for r in runs].count("COMPLETED") == 1
    # reserve ran once although two later stretches replayed it; charge twice
    lambda_name = steps[-1].name.removeprefix("substantial.step ")
    assert [(s.name, attrs(s)["substantial.attempt"]) for s in steps] == [
        ("substantial.step reserve", 1),
        ("substantial.step charge", 1),
        ("substantial.step charge", 2),
        (f"substantial.step {lambda_name}", 1),
    ]
    assert lambda_name.startswith("test_spans.py:"), lambda_name  # a lambda: its location
    run_ids = {ctx(r).span_id: r for r in runs}
    for s in steps:
        assert s.parent is not None and s.parent.span_id in run_ids
        assert attrs(s)["substantial.run_id"] == h.run_id
        assert attrs(s)["substantial.workflow"] == "ts.booking"
        assert attrs(s)["substantial.step"] == s.name.removeprefix("substantial.step ")
    assert steps[1].status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in steps[1].events)
    assert steps[2].status.status_code != StatusCode.ERROR
    # the retry ran in a later stretch than the failed attempt
    assert steps[1].parent is not None and steps[2].parent is not None
    assert steps[1].parent.span_id != steps[2].parent.span_id


@workflow(name="ts.fails")
async def fails(c: Context) -> None:
    await c.save(reserve)
    raise RuntimeError("bug in the workflow")


async def test_a_failed_run_started_outside_any_span_has_a_trace_of_its_own(
    conductor: Conductor, provider: Tracing, registry: CollectorRegistry
) -> None:
    _, exporter = provider
    conductor.register(fails)
    async with serving(conductor, registry):
        h = await conductor.start(fails)  # no current span
        with pytest.raises(RunFailed, match="bug in the workflow"):
            await h.result(timeout=20)
    spans = exporter.get_finished_spans()
    (start,) = [s for s in spans if s.name == "substantial.start ts.fails"]
    (run,) = [s for s in spans if s.name == "substantial.run ts.fails"]
    assert start.parent is None
    assert attrs(start)["substantial.run_id"] == h.run_id
    assert run.parent is not None and run.parent.span_id == ctx(start).span_id
    assert attrs(run)["substantial.status"] == "FAILED"
    assert run.status.status_code == StatusCode.ERROR
    assert "RuntimeError" in (run.status.description or "")


async def test_the_callers_trace_context_is_stored_in_the_start_record(
    conductor: Conductor, provider: Tracing
) -> None:
    tp, _ = provider
    conductor.register(fails)
    with tp.get_tracer("test").start_as_current_span("caller") as caller:
        h = await conductor.start(fails)
    start = await first_record(conductor, h.run_id)
    _version, trace_id, span_id, _flags = start["traceparent"].split("-")
    assert trace_id == f"{caller.get_span_context().trace_id:032x}"
    assert span_id == f"{caller.get_span_context().span_id:016x}"


async def test_without_tracing_the_start_record_holds_no_trace_context(
    conductor: Conductor,
) -> None:
    telemetry.configure(tracer_provider=NoOpTracerProvider())
    try:
        conductor.register(fails)
        h = await conductor.start(fails)
    finally:
        telemetry.configure(tracer_provider=None)
    assert "traceparent" not in await first_record(conductor, h.run_id)


async def first_record(conductor: Conductor, run_id: str) -> dict[str, Any]:
    import orjson

    snap = await conductor.journal.backend.read(run_id)
    assert snap is not None
    rec = orjson.loads(snap.log[0])
    assert isinstance(rec, dict)
    return rec


@workflow(name="ts.nested")
async def nested(c: Context) -> str:
    return await c.save(plain_step_with_a_span)


def plain_step_with_a_span() -> str:
    """A plain function (it runs in a thread) that makes a span of its own."""
    tracer = user_tracer[0]
    with tracer.start_as_current_span("inside the step"):
        return "done"


user_tracer: list[Any] = []


async def test_spans_made_inside_a_plain_step_nest_under_its_step_span(
    conductor: Conductor, provider: Tracing, registry: CollectorRegistry
) -> None:
    tp, exporter = provider
    user_tracer[:] = [tp.get_tracer("user code")]
    conductor.register(nested)
    async with serving(conductor, registry):
        assert await (await conductor.start(nested)).result(timeout=20) == "done"
    spans = exporter.get_finished_spans()
    (step,) = [s for s in spans if s.name.startswith("substantial.step ")]
    (inner,) = [s for s in spans if s.name == "inside the step"]
    assert step.name == "substantial.step plain_step_with_a_span"
    assert inner.parent is not None and inner.parent.span_id == ctx(step).span_id


@workflow(name="ts.child")
async def child(c: Context) -> str:
    return await c.save(reserve)


@workflow(name="ts.parent")
async def parent(c: Context) -> str:
    h = await c.start_child(child, {})
    return str(await h.result())


async def test_a_child_run_joins_its_parents_trace(
    conductor: Conductor, provider: Tracing, registry: CollectorRegistry
) -> None:
    tp, exporter = provider
    conductor.register(parent, child)
    async with serving(conductor, registry):
        with tp.get_tracer("test").start_as_current_span("caller"):
            h = await conductor.start(parent)
        assert await h.result(timeout=20) == "seat"
    spans = exporter.get_finished_spans()
    (caller,) = [s for s in spans if s.name == "caller"]
    parent_runs = [s for s in spans if s.name == "substantial.run ts.parent"]
    (child_run,) = [s for s in spans if s.name == "substantial.run ts.child"]
    assert {ctx(s).trace_id for s in spans} == {ctx(caller).trace_id}
    assert child_run.parent is not None
    assert child_run.parent.span_id in {ctx(s).span_id for s in parent_runs}
