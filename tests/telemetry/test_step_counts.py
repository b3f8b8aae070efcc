"""The per-step figures are kept per thread without locks and added up when
scraped: counts from several threads all arrive, and each duration falls in
the bucket Prometheus means (``le``: at most the bound)."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from substantial.telemetry._metrics import ACTIVE, CLAIMS, ERROR, OK, RETRY, STEP_BUCKETS, Metrics


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_counts_from_several_threads_add_up() -> None:
    reg = CollectorRegistry()
    counts = Metrics.on(reg)

    def work() -> None:
        meter = counts.step_meter("wf")  # a stretch's meter: one thread counts with it
        for _ in range(1000):
            meter.done(OK, 0.002)
        meter.done(RETRY, 0.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts.step_meter("other").done(ERROR, 0.0)
    counts.step_meter("other").done(None, 0.5)  # interrupted: timed, not counted
    assert sample(reg, "substantial_steps_total", workflow="wf", outcome="ok") == 4000
    assert sample(reg, "substantial_steps_total", workflow="wf", outcome="retry") == 4
    assert sample(reg, "substantial_steps_total", workflow="wf", outcome="error") == 0
    assert sample(reg, "substantial_steps_total", workflow="other", outcome="error") == 1
    assert sample(reg, "substantial_step_duration_seconds_count", workflow="wf") == 4004
    total = sample(reg, "substantial_step_duration_seconds_sum", workflow="wf")
    assert total is not None and abs(total - 8.0) < 1e-6
    assert sample(reg, "substantial_step_duration_seconds_count", workflow="other") == 2


def test_a_duration_lands_in_every_bucket_whose_bound_is_at_least_it() -> None:
    reg = CollectorRegistry()
    counts = Metrics.on(reg)
    counts.step_meter("wf").done(OK, 0.005)  # exactly a bound: counted in it
    counts.step_meter("wf").done(OK, 0.0051)
    counts.step_meter("wf").done(OK, 1000.0)  # beyond the last bound: +Inf only

    def bucket(le: str) -> float | None:
        return sample(reg, "substantial_step_duration_seconds_bucket", workflow="wf", le=le)

    assert bucket("0.001") == 0
    assert bucket("0.005") == 1
    assert bucket("0.01") == 2
    assert bucket(str(float(STEP_BUCKETS[-1]))) == 2
    assert bucket("+Inf") == 3


def test_run_figures_from_several_threads_add_up_and_the_gauge_comes_back_down() -> None:
    reg = CollectorRegistry()
    m = Metrics.on(reg)

    def work() -> None:
        for _ in range(100):
            m.add(CLAIMS)
            m.add(ACTIVE)
            m.run_started("wf")
            m.run_ended("wf", "COMPLETED", 0.05)
            m.add(ACTIVE, -1.0)
        m.add(ACTIVE)  # one run still driven by each thread

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sample(reg, "substantial_claims_total") == 300
    assert sample(reg, "substantial_runs_started_total", workflow="wf") == 300
    ended = sample(reg, "substantial_runs_ended_total", workflow="wf", status="COMPLETED")
    assert ended == 300
    assert sample(reg, "substantial_run_duration_seconds_count", workflow="wf") == 300
    assert sample(reg, "substantial_run_duration_seconds_bucket", workflow="wf", le="0.01") == 0
    assert sample(reg, "substantial_run_duration_seconds_bucket", workflow="wf", le="0.1") == 300
    assert sample(reg, "substantial_active_runs") == 3
    assert sample(reg, "substantial_leases_lost_total") == 0


def test_our_names_taken_on_a_registry_are_refused_there() -> None:
    reg = CollectorRegistry()
    Metrics.on(reg)
    with pytest.raises(ValueError):
        Metrics.on(reg)
