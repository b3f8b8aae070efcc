"""The OpenTelemetry side: finding a configured SDK, the W3C trace context a run
carries in its start record, and the spans of a stretch.

opentelemetry is never imported from here: it is used once the application has
imported it (see :func:`otel`), and with the API alone (no SDK configured) no
span object is ever made.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _records as R

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

    from .._session import RunSession

T = TypeVar("T")
W3C_FIELDS = ("traceparent", "tracestate")

# The tracer of the stretch being driven in this task (None: not tracing). Steps
# read it instead of asking OpenTelemetry for its provider each time.
stretch_tracer: ContextVar[Tracer | None] = ContextVar("substantial_tracer", default=None)


@dataclass(slots=True)
class _State:
    otel: Any = None  # the opentelemetry.trace module, once the application imported it
    env_checked: bool = False  # OTEL_PYTHON_TRACER_PROVIDER looked for
    provider: TracerProvider | None = None  # configure()'s, else the global one
    tracer: Tracer | None = None  # made by traced_by, the last real provider seen
    traced_by: Any = None


_state = _State()


def otel() -> Any:
    """The ``opentelemetry.trace`` module once the application has imported it,
    else None. Not imported from here (but for a provider named by
    ``OTEL_PYTHON_TRACER_PROVIDER`` alone): an application that traces has
    imported it before its runs start (to set a provider, or through
    ``opentelemetry-instrument``), and one that does not pays nothing for it: no
    import time, and none of its thousands of objects in every full garbage
    collection. Once seen, kept (a dict lookup per stretch until then)."""
    mod = _state.otel
    if mod is None:
        mod = sys.modules.get("opentelemetry.trace")
        if mod is None and not _state.env_checked:
            _state.env_checked = True
            if "OTEL_PYTHON_TRACER_PROVIDER" in os.environ:
                with contextlib.suppress(ImportError):
                    from opentelemetry import trace as mod
        _state.otel = mod
    return mod


def use_provider(provider: TracerProvider | None) -> None:
    _state.provider = provider
    _state.tracer = _state.traced_by = None


def tracer() -> Tracer | None:
    """Substantial's tracer, or None while no SDK is configured.

    Asked once per stretch and per start (steps read :data:`stretch_tracer`):
    finding the provider costs an environment lookup. The tracer is kept while
    the provider stays the same one; a provider replaced (test suites reset
    OpenTelemetry's global between tests) gets a tracer of its own."""
    trace = otel()
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
    return tracer() is not None


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


def inject_context(start: R.Record, run_id: str) -> None:
    """Journal.create: store the caller's W3C trace context in the start record.

    Called outside any span in a process that traces, the run gets a trace of
    its own: a ``substantial.start <workflow>`` span (ended at once) whose
    context every stretch then joins, rather than one trace per stretch."""
    trace = otel()
    if trace is None:
        return
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        _propagator().inject(carrier)
    else:
        t = tracer()
        if t is None:
            return
        attrs = {"substantial.run_id": run_id, "substantial.workflow": str(start.get("wf"))}
        with t.start_as_current_span(f"substantial.start {start.get('wf')}", attributes=attrs):
            _propagator().inject(carrier)
    for key in W3C_FIELDS:
        if key in carrier:
            start[key] = carrier[key]


def end_record(session: RunSession) -> R.Record | None:
    """The end record, if this stretch wrote it (it is then the log's last)."""
    last = session.records[-1] if session.records else None
    return last if last is not None and last.get("k") == R.END else None


async def traced_stretch(t: Tracer, session: RunSession, workflow: str, aw: Awaitable[T]) -> T:
    """Await ``aw`` under a ``substantial.run`` span parented to the context the
    run's start record carries; steps inside find the tracer in the context."""
    trace = otel()
    from opentelemetry.trace import Status, StatusCode

    parent = _propagator().extract(
        {k: session.start[k] for k in W3C_FIELDS if isinstance(session.start.get(k), str)}
    )
    attrs = {"substantial.run_id": session.run_id, "substantial.workflow": workflow}
    span = t.start_span(f"substantial.run {workflow}", context=parent, attributes=attrs)
    # a cancel is a shutdown handing the run back (no error) unless the lease was lost
    with trace.use_span(span, end_on_exit=True, record_exception=False):
        token = stretch_tracer.set(t)
        try:
            result = await aw
        except BaseException as exc:  # the store failed, or the lease was lost
            lost = session.lost if session.lost is not None else exc
            if isinstance(lost, Exception):
                span.record_exception(lost)
                span.set_status(Status(StatusCode.ERROR, f"{type(lost).__name__}: {lost}"))
            raise
        finally:
            stretch_tracer.reset(token)
        end = end_record(session)
        if end is not None:
            span.set_attribute("substantial.status", str(end.get("status")))
            err = end.get("err")
            if isinstance(err, dict):
                span.set_status(Status(StatusCode.ERROR, f"{err.get('type')}: {err.get('msg')}"))
        return result


async def traced_step(
    t: Tracer, aw: Awaitable[T], run_id: str, workflow: str, name: str, attempt: int
) -> T:
    """Await ``aw`` (one attempt of a save) under a ``substantial.step`` span."""
    attrs: dict[str, str | int] = {
        "substantial.run_id": run_id,
        "substantial.workflow": workflow,
        "substantial.step": name,
        "substantial.attempt": attempt,
    }
    with t.start_as_current_span(f"substantial.step {name}", attributes=attrs):
        return await aw
