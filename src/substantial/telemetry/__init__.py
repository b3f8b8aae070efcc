"""Prometheus metrics and OpenTelemetry spans, both optional and both cheap.

Neither dependency is imported when this module is: ``prometheus_client``
(the ``metrics`` extra) is looked for on first use, ``opentelemetry`` (the
``otel`` extra, the API only) is used once the application has imported it,
and everything here does nothing when they are missing. Tracing also does
nothing until the application configures an OpenTelemetry SDK (a real
``TracerProvider``): without one, no span object is ever made.

Metrics (one set per process, on prometheus_client's default registry unless
:func:`configure` names another):

==========================================  =======================================
``substantial_runs_started_total``          {workflow}: runs a worker began to drive
                                            (the run's first claim, lease token 1)
``substantial_runs_ended_total``            {workflow, status}: runs a worker ended
``substantial_steps_total``                 {workflow, outcome}: executed attempts of
                                            a save: ok, error (final), retry
``substantial_step_duration_seconds``       {workflow}: time in a save's effect, per
                                            attempt (histogram)
``substantial_run_duration_seconds``        {workflow}: creation to end (histogram)
``substantial_claims_total``                runs claimed
``substantial_leases_lost_total``           leases taken over by another worker
``substantial_replays_total``               stretches that replayed a log
``substantial_active_runs``                 runs this process drives now (gauge)
==========================================  =======================================

Counting happens where workers act, so a fleet's figures are the sum over its
worker processes, and a client process that only calls ``start`` counts
nothing. Spans: ``substantial.run <workflow>`` per stretch a worker drives a
run, ``substantial.step <name>`` per executed attempt of a save (none for a
call a replay answers from the log). The W3C trace context of the code that
calls ``start`` goes into the run's start record, so the run's spans join the
caller's trace. See docs/how-to/telemetry.md.

The engine calls the hooks at the bottom of this module; each is one line at
its call site. ``_metrics`` holds the Prometheus side, ``_tracing`` the
OpenTelemetry side.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _records as R
from ..errors import LeaseLost
from . import _metrics as M
from . import _tracing as TR
from ._metrics import MetricsServer, metrics_enabled, render_metrics, serve_metrics
from ._tracing import inject_context as inject_context  # a hook: Journal.create
from ._tracing import step_name, tracing_enabled

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from .._session import RunSession

__all__ = [
    "MetricsServer",
    "configure",
    "metrics_enabled",
    "render_metrics",
    "serve_metrics",
    "step_name",
    "tracing_enabled",
]

T = TypeVar("T")
_KEEP: Any = object()


def configure(
    *,
    registry: CollectorRegistry | None = _KEEP,
    tracer_provider: TracerProvider | None = _KEEP,
) -> None:
    """Count metrics on ``registry`` instead of prometheus_client's default one,
    and make spans with ``tracer_provider`` instead of OpenTelemetry's global
    provider; ``None`` restores the default, an omitted argument is left as it
    is. Meant for tests and for applications that keep their own registry;
    call it before work starts (metrics counted so far stay where they were)."""
    if registry is not _KEEP:
        M.use_registry(registry)
    if tracer_provider is not _KEEP:
        TR.use_provider(tracer_provider)


# -- hooks the engine calls (one line each at the call site) ------------------------


def claimed() -> None:
    """Worker: a run was claimed."""
    m = M.current()
    if m is not None:
        m.add(M.CLAIMS)


async def run_stretch(session: RunSession, workflow: str, aw: Awaitable[T]) -> T:
    """Worker: drive one stretch of a run (``aw``, the engine's drive) under a
    ``substantial.run`` span parented to the trace context stored at start, and
    count it: started (the run's first claim), replay (its log holds more than
    the start record), active while it lasts, ended with its status if it wrote
    the end record, lease lost if fenced out."""
    m = M.current()
    if m is not None:
        if session.token == 1:  # tokens grow by one per claim: this is the run's first
            m.run_started(workflow)
        if len(session.records) > 1:  # the workflow re-runs over what it recorded
            m.add(M.REPLAYS)
        m.add(M.ACTIVE)
    try:
        tracer = TR.tracer()
        if tracer is None:
            return await aw
        return await TR.traced_stretch(tracer, session, workflow, aw)
    finally:
        if m is not None:
            _count_end(m, session, workflow)


def _count_end(m: M.Metrics, session: RunSession, workflow: str) -> None:
    m.add(M.ACTIVE, -1.0)
    end = TR.end_record(session)
    if end is not None:
        seconds = max(session.journal.clock() - session.run.created_at, 0.0)
        m.run_ended(workflow, str(end.get("status")), seconds)
    if isinstance(session.lost, LeaseLost):
        m.add(M.LEASES_LOST)


def step(
    aw: Awaitable[T],
    run_id: str,
    workflow: str,
    name: Callable[..., Any] | str,
    at: str,
    attempt: int,
) -> Awaitable[T]:
    """Steps: one executed attempt of a save (``aw``, the effect), under a
    ``substantial.step <name>`` span while the stretch is traced; ``aw`` itself
    otherwise (no wrapper on the hot path). ``name``: the step's name or its
    callable (named by :func:`step_name`)."""
    tracer = TR.stretch_tracer.get()
    if tracer is None:
        return aw
    return TR.traced_step(tracer, aw, run_id, workflow, step_name(name, at), attempt)


def step_meter(workflow: str) -> M.StepMeter | None:
    """Steps: what a stretch of ``workflow`` counts its executed attempts with
    (None: metrics are off). Made once per stretch: counting is then arithmetic."""
    m = M.current()
    return None if m is None else m.step_meter(workflow)


def step_done(
    meter: M.StepMeter | None,
    final: R.Record | None,
    seconds: float,
    *,
    interrupted: bool = False,
) -> None:
    """Steps: an executed attempt of a save spent ``seconds`` in its effect and
    ended with ``final`` (its value or its last error; None: it will be retried).
    An ``interrupted`` attempt (the worker stopping) is timed but not counted."""
    if meter is not None:
        if interrupted:
            outcome = None
        else:
            outcome = M.RETRY if final is None else M.ERROR if "err" in final else M.OK
        meter.done(outcome, seconds)
