"""Prometheus metrics and OpenTelemetry spans, both optional and both cheap.

Neither dependency is imported when this module is: ``prometheus_client``
(the ``metrics`` extra) and ``opentelemetry`` (the ``otel`` extra, the API
only) are looked for on first use, and everything here does nothing when they
are missing. Tracing also does nothing until the application configures an
OpenTelemetry SDK (a real ``TracerProvider``): without one, no span object is
ever made.

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
its call site.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from weakref import WeakKeyDictionary

from . import _records as R
from .errors import ConfigurationError, LeaseLost

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from ._session import RunSession

__all__ = [
    "MetricsServer",
    "configure",
    "metrics_enabled",
    "render_metrics",
    "serve_metrics",
    "tracing_enabled",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RUN_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
_W3C_FIELDS = ("traceparent", "tracestate")
# The tracer of the stretch being driven in this task (None: not tracing). Steps
# read it instead of asking OpenTelemetry for its provider each time.
_stretch_tracer: ContextVar[Tracer | None] = ContextVar("substantial_tracer", default=None)

# -- metrics ---------------------------------------------------------------------


@dataclass(slots=True)
class _Metrics:
    """The metric families on one registry, and their labelled children cached
    per workflow (``labels()`` takes a lock and a dict lookup; a step should not)."""

    started: Counter
    ended: Counter
    steps: Counter
    step_seconds: Histogram
    run_seconds: Histogram
    claims: Counter
    leases_lost: Counter
    replays: Counter
    active: Gauge
    _per_wf: dict[str, tuple[Any, Any, Any, Any]] = field(default_factory=dict)

    @classmethod
    def on(cls, reg: CollectorRegistry) -> _Metrics:
        from prometheus_client import Counter, Gauge, Histogram

        wf = ("workflow",)
        return cls(
            started=Counter(
                "substantial_runs_started", "Runs a worker began to drive.", wf, registry=reg
            ),
            ended=Counter(
                "substantial_runs_ended",
                "Runs that ended, by final status.",
                ("workflow", "status"),
                registry=reg,
            ),
            steps=Counter(
                "substantial_steps",
                "Executed attempts of a save, by outcome (ok, error, retry).",
                ("workflow", "outcome"),
                registry=reg,
            ),
            step_seconds=Histogram(
                "substantial_step_duration_seconds",
                "Time spent in a save's effect, per attempt.",
                wf,
                buckets=STEP_BUCKETS,
                registry=reg,
            ),
            run_seconds=Histogram(
                "substantial_run_duration_seconds",
                "Time from a run's creation to its end.",
                wf,
                buckets=RUN_BUCKETS,
                registry=reg,
            ),
            claims=Counter("substantial_claims", "Runs claimed by a worker.", registry=reg),
            leases_lost=Counter(
                "substantial_leases_lost", "Leases another worker took over.", registry=reg
            ),
            replays=Counter(
                "substantial_replays",
                "Stretches that replayed a run's log to resume it.",
                registry=reg,
            ),
            active=Gauge(
                "substantial_active_runs", "Runs this process is driving now.", registry=reg
            ),
        )

    def step_children(self, workflow: str) -> tuple[Any, Any, Any, Any]:
        """(ok, error, retry, duration) children for ``workflow``."""
        got = self._per_wf.get(workflow)
        if got is None:
            got = (
                self.steps.labels(workflow, "ok"),
                self.steps.labels(workflow, "error"),
                self.steps.labels(workflow, "retry"),
                self.step_seconds.labels(workflow),
            )
            self._per_wf[workflow] = got
        return got


@dataclass(slots=True)
class _State:
    """What this process knows about the optional libraries (looked up once)."""

    metrics: _Metrics | None = None
    metrics_missing: bool = False
    made: WeakKeyDictionary[Any, _Metrics] = field(default_factory=WeakKeyDictionary)
    registry: CollectorRegistry | None = None
    otel: Any = None  # the opentelemetry.trace module, once imported
    otel_missing: bool = False
    provider: TracerProvider | None = None  # configure()'s, else the global one
    tracer: Tracer | None = None  # made by traced_by, the last real provider seen
    traced_by: Any = None


_state = _State()


def _metrics() -> _Metrics | None:
    """The metrics being counted, made on first use (None without prometheus-client)."""
    m = _state.metrics
    if m is not None or _state.metrics_missing:
        return m
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        _state.metrics_missing = True
        return None
    reg = REGISTRY if _state.registry is None else _state.registry
    m = _state.made.get(reg)  # a registry configured again keeps its families
    if m is None:
        try:
            m = _Metrics.on(reg)
        except ValueError as exc:  # the names are taken on that registry: never break a run
            log.warning("substantial's metrics are off: %s", exc)
            _state.metrics_missing = True
            return None
        _state.made[reg] = m
    _state.metrics = m
    return m


def metrics_enabled() -> bool:
    """True when prometheus-client is installed (so metrics are being counted)."""
    return _metrics() is not None


def _require_metrics() -> _Metrics:
    m = _metrics()
    if m is None:
        raise ConfigurationError(
            "metrics need prometheus-client: pip install 'substantial[metrics]'"
        )
    return m


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of this process's registry and its content
    type, for a ``/metrics`` route. Raises ConfigurationError without
    prometheus-client."""
    _require_metrics()
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    reg = REGISTRY if _state.registry is None else _state.registry
    return generate_latest(reg), CONTENT_TYPE_LATEST


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running ``/metrics`` HTTP server (a daemon thread); ``close()`` stops it."""

    host: str
    port: int
    _server: Any

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve the Prometheus exposition on ``http://host:port/`` (any path) from a
    daemon thread, as ``worker --metrics-port`` does. ``port=0`` picks a free one."""
    _require_metrics()
    from prometheus_client import REGISTRY, start_http_server

    reg = REGISTRY if _state.registry is None else _state.registry
    server, _thread = start_http_server(port, addr=host, registry=reg)
    return MetricsServer(host=host, port=int(server.server_address[1]), _server=server)


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
        _state.registry = registry
        _state.metrics = None
        _state.metrics_missing = False
    if tracer_provider is not _KEEP:
        _state.provider = tracer_provider
        _state.tracer = _state.traced_by = None


# -- tracing ----------------------------------------------------------------------


def _otel() -> Any:
    """The ``opentelemetry.trace`` module, or None when it is not installed."""
    mod = _state.otel
    if mod is not None or _state.otel_missing:
        return mod
    try:
        from opentelemetry import trace
    except ImportError:
        _state.otel_missing = True
        return None
    _state.otel = trace
    return trace


def _tracer() -> Tracer | None:
    """Substantial's tracer, or None while no SDK is configured.

    Asked once per stretch and per start (steps read :data:`_stretch_tracer`):
    finding the provider costs an environment lookup. The tracer is kept while
    the provider stays the same one; a provider replaced (test suites reset
    OpenTelemetry's global between tests) gets a tracer of its own."""
    trace = _otel()
    if trace is None:
        return None
    provider = _state.provider or trace.get_tracer_provider()
    if provider is _state.traced_by:
        return _state.tracer
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    _state.tracer = provider.get_tracer("substantial")
    _state.traced_by = provider
    return _state.tracer


def tracing_enabled() -> bool:
    """True once an OpenTelemetry SDK is configured: spans are being made."""
    return _tracer() is not None


def _propagator() -> Any:
    """W3C trace context, whatever propagator the application set globally: the
    start record's fields are ours and keep one format."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def step_name(f: Callable[..., Any] | str, at: str) -> str:
    """How a step is named: the given name, else the callable's qualified name;
    a lambda (or a callable without one) by its code location."""
    if isinstance(f, str):
        return f
    name = getattr(f, "__qualname__", None)
    if not isinstance(name, str) or "<lambda>" in name:
        return at
    return name


# -- hooks the engine calls (one line each at the call site) ------------------------


def inject_context(start: R.Record, run_id: str) -> None:
    """Journal.create: store the caller's W3C trace context in the start record.

    Called outside any span in a process that traces, the run gets a trace of
    its own: a ``substantial.start <workflow>`` span (ended at once) whose
    context every stretch then joins, rather than one trace per stretch."""
    trace = _otel()
    if trace is None:
        return
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        _propagator().inject(carrier)
    else:
        tracer = _tracer()
        if tracer is None:
            return
        attrs = {"substantial.run_id": run_id, "substantial.workflow": str(start.get("wf"))}
        with tracer.start_as_current_span(f"substantial.start {start.get('wf')}", attributes=attrs):
            _propagator().inject(carrier)
    for key in _W3C_FIELDS:
        if key in carrier:
            start[key] = carrier[key]


def claimed() -> None:
    """Worker: a run was claimed."""
    m = _metrics()
    if m is not None:
        m.claims.inc()


async def run_stretch(session: RunSession, workflow: str, aw: Awaitable[T]) -> T:
    """Worker: drive one stretch of a run (``aw``, the engine's drive) under a
    ``substantial.run`` span parented to the trace context stored at start, and
    count it: started (the run's first claim), replay (its log holds more than
    the start record), active while it lasts, ended with its status if it wrote
    the end record, lease lost if fenced out."""
    m = _metrics()
    if m is not None:
        if session.token == 1:  # tokens grow by one per claim: this is the run's first
            m.started.labels(workflow).inc()
        if len(session.records) > 1:  # the workflow re-runs over what it recorded
            m.replays.inc()
        m.active.inc()
    try:
        tracer = _tracer()
        if tracer is None:
            return await aw
        return await _traced_stretch(tracer, session, workflow, aw)
    finally:
        if m is not None:
            _count_end(m, session, workflow)


def _end_record(session: RunSession) -> R.Record | None:
    last = session.records[-1] if session.records else None
    return last if last is not None and last.get("k") == R.END else None


def _count_end(m: _Metrics, session: RunSession, workflow: str) -> None:
    m.active.dec()
    end = _end_record(session)
    if end is not None:
        m.ended.labels(workflow, str(end.get("status"))).inc()
        m.run_seconds.labels(workflow).observe(
            max(session.journal.clock() - session.run.created_at, 0.0)
        )
    if isinstance(session.lost, LeaseLost):
        m.leases_lost.inc()


async def _traced_stretch(
    tracer: Tracer, session: RunSession, workflow: str, aw: Awaitable[T]
) -> T:
    trace = _otel()
    from opentelemetry.trace import Status, StatusCode

    parent = _propagator().extract(
        {k: session.start[k] for k in _W3C_FIELDS if isinstance(session.start.get(k), str)}
    )
    attrs = {"substantial.run_id": session.run_id, "substantial.workflow": workflow}
    span = tracer.start_span(f"substantial.run {workflow}", context=parent, attributes=attrs)
    # a cancel is a shutdown handing the run back (no error) unless the lease was lost
    with trace.use_span(span, end_on_exit=True, record_exception=False):
        token = _stretch_tracer.set(tracer)
        try:
            result = await aw
        except BaseException as exc:  # the store failed, or the lease was lost
            lost = session.lost if session.lost is not None else exc
            if isinstance(lost, Exception):
                span.record_exception(lost)
                span.set_status(Status(StatusCode.ERROR, f"{type(lost).__name__}: {lost}"))
            raise
        finally:
            _stretch_tracer.reset(token)
        end = _end_record(session)
        if end is not None:
            span.set_attribute("substantial.status", str(end.get("status")))
            err = end.get("err")
            if isinstance(err, dict):
                span.set_status(Status(StatusCode.ERROR, f"{err.get('type')}: {err.get('msg')}"))
        return result


async def step(
    aw: Awaitable[T],
    run_id: str,
    workflow: str,
    name: Callable[..., Any] | str,
    at: str,
    attempt: int,
) -> T:
    """Context: one executed attempt of a save (``aw``, the effect), timed and
    under a ``substantial.step <name>`` span. ``name``: the step's name or its
    callable (named by :func:`step_name`)."""
    m = _metrics()
    t0 = time.perf_counter()
    try:
        tracer = _stretch_tracer.get()
        if tracer is None:
            return await aw
        label = step_name(name, at)
        attrs: dict[str, str | int] = {
            "substantial.run_id": run_id,
            "substantial.workflow": workflow,
            "substantial.step": label,
            "substantial.attempt": attempt,
        }
        with tracer.start_as_current_span(f"substantial.step {label}", attributes=attrs):
            return await aw
    finally:
        if m is not None:
            m.step_children(workflow)[3].observe(time.perf_counter() - t0)


def step_ended(workflow: str, final: R.Record) -> None:
    """Context: an executed save's final record (its value, or its last error) is
    about to be written."""
    m = _metrics()
    if m is not None:
        m.step_children(workflow)[1 if "err" in final else 0].inc()


def step_retried(workflow: str) -> None:
    """Context: a failed attempt will be retried (its ``try`` record is written)."""
    m = _metrics()
    if m is not None:
        m.step_children(workflow)[2].inc()
