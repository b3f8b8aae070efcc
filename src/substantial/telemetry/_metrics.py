"""The Prometheus side: the figures, their exposition, a server.

prometheus_client is imported on first use only, and stays off the hot path:
every figure is kept in plain per-thread rows of floats (:class:`Tally`), with
no lock and no label lookup when a step or a run counts, and read by one
collector (:class:`Metrics`) that adds the threads' rows up at scrape time.
The exposition is what Counter, Histogram and Gauge would print.
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
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("substantial.telemetry")

STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RUN_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
OUTCOMES = ("ok", "error", "retry")
OK, ERROR, RETRY = 0, 1, 2  # positions in a step row: [ok, error, retry, sum, buckets...]
_STEP_SUM = 3
STARTED, _RUN_SUM = 0, 1  # a run row: [started, seconds sum, buckets...]
CLAIMS, LEASES_LOST, REPLAYS, ACTIVE = 0, 1, 2, 3  # the process row
Key = tuple[str, ...]


class Tally:
    """Rows of ``width`` floats by label values, kept per thread.

    Each thread that counts (an event loop's) writes rows of its own; the
    collector adds the threads' rows up when scraped. A counter's slots only
    grow, so a scrape racing a count sees it or not, never a counter going down;
    the active-runs gauge is a slot that goes up and down."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._local = threading.local()
        self._threads: list[dict[Key, list[float]]] = []
        self._lock = threading.Lock()  # taken only by a thread's first count

    def row(self, key: Key) -> list[float]:
        try:
            rows: dict[Key, list[float]] = self._local.rows
        except AttributeError:
            rows = self._local.rows = {}
            with self._lock:
                self._threads.append(rows)
        found = rows.get(key)
        if found is None:
            found = rows[key] = [0.0] * self.width
        return found

    def totals(self) -> dict[Key, list[float]]:
        with self._lock:
            threads = list(self._threads)
        out: dict[Key, list[float]] = {}
        for rows in threads:
            for key, row in rows.copy().items():  # (a copy: a thread may add a row)
                acc = out.setdefault(key, [0.0] * self.width)
                for i, v in enumerate(list(row)):
                    acc[i] += v
        return out


def _observe(row: list[float], at: int, bounds: tuple[float, ...], seconds: float) -> None:
    """A histogram observation in ``row``: the sum at ``at``, the buckets after it."""
    row[at] += seconds
    row[at + 1 + bisect.bisect_left(bounds, seconds)] += 1  # le: bound >= value


class StepMeter:
    """One workflow's step figures as one thread counts them: a stretch makes one
    and counts every attempt it executes with it, so an attempt costs no lookup.
    Its row is found on the first count (a stretch that executes nothing adds no
    row, hence no zero series)."""

    __slots__ = ("_key", "_row", "_tally")

    def __init__(self, tally: Tally, key: Key) -> None:
        self._tally = tally
        self._key = key
        self._row: list[float] | None = None

    def done(self, outcome: int | None, seconds: float) -> None:
        """One executed attempt: its outcome counted (None: not counted), its time."""
        row = self._row
        if row is None:
            row = self._row = self._tally.row(self._key)
        if outcome is not None:
            row[outcome] += 1
        _observe(row, _STEP_SUM, STEP_BUCKETS, seconds)


class Metrics:
    """Substantial's figures on one registry (a collector of its own)."""

    def __init__(self) -> None:
        self.steps = Tally(_STEP_SUM + 1 + len(STEP_BUCKETS) + 1)  # by (workflow,)
        self.runs = Tally(_RUN_SUM + 1 + len(RUN_BUCKETS) + 1)  # by (workflow,)
        self.ended = Tally(1)  # by (workflow, status)
        self.process = Tally(4)  # one row, key ()

    @classmethod
    def on(cls, reg: CollectorRegistry) -> Metrics:
        m = cls()
        reg.register(m)  # ValueError if our names are taken there
        return m

    # -- counting (the hot path: plain list arithmetic) ----------------------------

    def step_meter(self, workflow: str) -> StepMeter:
        """What ``workflow``'s executed attempts are counted with (see StepMeter)."""
        return StepMeter(self.steps, (workflow,))

    def run_started(self, workflow: str) -> None:
        self.runs.row((workflow,))[STARTED] += 1

    def run_ended(self, workflow: str, status: str, seconds: float) -> None:
        self.ended.row((workflow, status))[0] += 1
        _observe(self.runs.row((workflow,)), _RUN_SUM, RUN_BUCKETS, seconds)

    def add(self, slot: int, amount: float = 1.0) -> None:
        """The process figures: CLAIMS, LEASES_LOST, REPLAYS, ACTIVE (+1 / -1)."""
        self.process.row(())[slot] += amount

    # -- the exposition -------------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        return self._families(empty=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(empty=False)

    def _families(self, *, empty: bool) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        steps, runs = ({}, {}) if empty else (self.steps.totals(), self.runs.totals())
        ended = {} if empty else self.ended.totals()
        proc = [0.0] * 4 if empty else self.process.totals().get((), [0.0] * 4)
        yield from _step_families(steps)
        started = CounterMetricFamily(
            "substantial_runs_started", "Runs a worker began to drive.", labels=("workflow",)
        )
        for key, row in sorted(runs.items()):
            started.add_metric(key, row[STARTED])
        yield started
        ends = CounterMetricFamily(
            "substantial_runs_ended", "Runs that ended, by final status.",
            labels=("workflow", "status"),
        )  # fmt: skip
        for key, row in sorted(ended.items()):
            ends.add_metric(key, row[0])
        yield ends
        yield _histogram(
            "substantial_run_duration_seconds", "Time from a run's creation to its end.",
            {k: r[_RUN_SUM:] for k, r in runs.items() if k in {e[:1] for e in ended}},
            RUN_BUCKETS,
        )  # fmt: skip
        for name, doc, slot in (
            ("substantial_claims", "Runs claimed by a worker.", CLAIMS),
            ("substantial_leases_lost", "Leases another worker took over.", LEASES_LOST),
            ("substantial_replays", "Stretches that replayed a run's log to resume it.", REPLAYS),
        ):
            yield CounterMetricFamily(name, doc, value=proc[slot])
        yield GaugeMetricFamily(
            "substantial_active_runs", "Runs this process is driving now.", value=proc[ACTIVE]
        )


def _step_families(totals: dict[Key, list[float]]) -> Iterator[Metric]:
    from prometheus_client.metrics_core import CounterMetricFamily

    steps = CounterMetricFamily(
        "substantial_steps",
        "Executed attempts of a save, by outcome (ok, error, retry).",
        labels=("workflow", "outcome"),
    )
    for key, row in sorted(totals.items()):
        for i, outcome in enumerate(OUTCOMES):
            steps.add_metric((*key, outcome), row[i])
    yield steps
    yield _histogram(
        "substantial_step_duration_seconds", "Time spent in a save's effect, per attempt.",
        {k: r[_STEP_SUM:] for k, r in totals.items()}, STEP_BUCKETS,
    )  # fmt: skip


def _histogram(
    name: str, doc: str, rows: dict[Key, list[float]], bounds: tuple[float, ...]
) -> Metric:
    """A histogram family from rows of ``[sum, bucket..., +Inf]`` by (workflow,)."""
    from prometheus_client.metrics_core import HistogramMetricFamily

    family = HistogramMetricFamily(name, doc, labels=("workflow",))
    les = [str(float(b)) for b in bounds] + ["+Inf"]  # as prometheus_client prints them
    for key, row in sorted(rows.items()):
        cumulative, running = [], 0.0
        for le, n in zip(les, row[1:], strict=True):
            running += n
            cumulative.append((le, running))
        family.add_metric(key, cumulative, sum_value=row[0])
    return family


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
