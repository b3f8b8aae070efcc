"""The Prometheus side: metric families on a registry, the exposition, a server.

prometheus_client is imported on first use only. Per-run figures use its
ordinary Counter, Histogram and Gauge. Per-step figures (the step counter and
the step histogram, touched on every executed attempt) are kept in plain
per-thread lists instead and read by a collector at scrape time: no lock and
no label lookup on the hot path, the same exposition.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("substantial.telemetry")

STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RUN_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
OUTCOMES = ("ok", "error", "retry")
OK, ERROR, RETRY, _SUM, _BUCKETS = 0, 1, 2, 3, 4  # positions in a step row


class StepCounts:
    """``substantial_steps_total`` and ``substantial_step_duration_seconds``.

    Each thread that counts (an event loop's) writes its own rows, one per
    workflow: ``[ok, error, retry, seconds, bucket..., +Inf]``; the collector
    adds the threads' rows up when scraped. Nothing is ever subtracted, so a
    scrape racing a step sees it or not, never half of it in a way that makes
    a counter go down."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._threads: list[dict[str, list[float]]] = []
        self._lock = threading.Lock()  # taken only by a thread's first count

    def _row(self, workflow: str) -> list[float]:
        try:
            rows: dict[str, list[float]] = self._local.rows
        except AttributeError:
            rows = self._local.rows = {}
            with self._lock:
                self._threads.append(rows)
        row = rows.get(workflow)
        if row is None:
            row = rows[workflow] = [0.0] * (_BUCKETS + len(STEP_BUCKETS) + 1)
        return row

    def count(self, workflow: str, outcome: int) -> None:
        self._row(workflow)[outcome] += 1

    def observe(self, workflow: str, seconds: float) -> None:
        row = self._row(workflow)
        row[_SUM] += seconds
        row[_BUCKETS + bisect.bisect_left(STEP_BUCKETS, seconds)] += 1  # le: bound >= value

    def _totals(self) -> dict[str, list[float]]:
        with self._lock:
            threads = list(self._threads)
        out: dict[str, list[float]] = {}
        for rows in threads:
            for wf, row in rows.copy().items():  # (a copy: a thread may add a row)
                acc = out.setdefault(wf, [0.0] * len(row))
                for i, v in enumerate(list(row)):
                    acc[i] += v
        return out

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self._totals())

    def _families(self, totals: dict[str, list[float]]) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily

        steps = CounterMetricFamily(
            "substantial_steps",
            "Executed attempts of a save, by outcome (ok, error, retry).",
            labels=("workflow", "outcome"),
        )
        seconds = HistogramMetricFamily(
            "substantial_step_duration_seconds",
            "Time spent in a save's effect, per attempt.",
            labels=("workflow",),
        )
        bounds = [str(float(b)) for b in STEP_BUCKETS] + ["+Inf"]  # as prometheus_client
        for wf, row in sorted(totals.items()):
            for i, outcome in enumerate(OUTCOMES):
                steps.add_metric((wf, outcome), row[i])
            cumulative, running = [], 0.0
            for bound, n in zip(bounds, row[_BUCKETS:], strict=True):
                running += n
                cumulative.append((bound, running))
            seconds.add_metric((wf,), cumulative, sum_value=row[_SUM])
        yield steps
        yield seconds


@dataclass(slots=True)
class Metrics:
    """The metric families on one registry, per-run children cached per workflow."""

    steps: StepCounts
    started: Counter
    ended: Counter
    run_seconds: Histogram
    claims: Counter
    leases_lost: Counter
    replays: Counter
    active: Gauge

    @classmethod
    def on(cls, reg: CollectorRegistry) -> Metrics:
        from prometheus_client import Counter, Gauge, Histogram

        steps = StepCounts()
        reg.register(steps)
        return cls(
            steps=steps,
            started=Counter(
                "substantial_runs_started", "Runs a worker began to drive.", ("workflow",),
                registry=reg,
            ),
            ended=Counter(
                "substantial_runs_ended", "Runs that ended, by final status.",
                ("workflow", "status"), registry=reg,
            ),
            run_seconds=Histogram(
                "substantial_run_duration_seconds", "Time from a run's creation to its end.",
                ("workflow",), buckets=RUN_BUCKETS, registry=reg,
            ),
            claims=Counter("substantial_claims", "Runs claimed by a worker.", registry=reg),
            leases_lost=Counter(
                "substantial_leases_lost", "Leases another worker took over.", registry=reg
            ),
            replays=Counter(
                "substantial_replays", "Stretches that replayed a run's log to resume it.",
                registry=reg,
            ),
            active=Gauge(
                "substantial_active_runs", "Runs this process is driving now.", registry=reg
            ),
        )  # fmt: skip


@dataclass(slots=True)
class _State:
    current: Metrics | None = None
    missing: bool = False  # no prometheus-client, or our names taken on the registry
    registry: CollectorRegistry | None = None  # None: prometheus_client's default
    made: WeakKeyDictionary[Any, Metrics] = field(default_factory=WeakKeyDictionary)


_state = _State()


def current() -> Metrics | None:
    """The metrics being counted, made on first use (None without prometheus-client)."""
    m = _state.current
    if m is not None or _state.missing:
        return m
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        _state.missing = True
        return None
    reg = REGISTRY if _state.registry is None else _state.registry
    m = _state.made.get(reg)  # a registry configured again keeps its families
    if m is None:
        try:
            m = Metrics.on(reg)
        except ValueError as exc:  # the names are taken on that registry: never break a run
            log.warning("substantial's metrics are off: %s", exc)
            _state.missing = True
            return None
        _state.made[reg] = m
    _state.current = m
    return m


def use_registry(registry: CollectorRegistry | None) -> None:
    _state.registry = registry
    _state.current = None
    _state.missing = False


def _registry() -> CollectorRegistry:
    if current() is None:
        raise ConfigurationError(
            "metrics need prometheus-client: pip install 'substantial[metrics]'"
        )
    from prometheus_client import REGISTRY

    return REGISTRY if _state.registry is None else _state.registry


def metrics_enabled() -> bool:
    """True when prometheus-client is installed (so metrics are being counted)."""
    return current() is not None


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of this process's registry and its content
    type, for a ``/metrics`` route. Raises ConfigurationError without
    prometheus-client."""
    reg = _registry()
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
    reg = _registry()
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=reg)
    return MetricsServer(host=host, port=int(server.server_address[1]), _server=server)
