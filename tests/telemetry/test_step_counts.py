"""The per-step figures are kept per thread without locks and added up when
scraped: counts from several threads all arrive, and each duration falls in
the bucket Prometheus means (``le``: at most the bound)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from substantial.telemetry._metrics import ERROR, OK, RETRY, STEP_BUCKETS, StepCounts


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_counts_from_several_threads_add_up() -> None:
    reg = CollectorRegistry()
    counts = StepCounts()
    reg.register(counts)

    def work() -> None:
        for _ in range(1000):
            counts.count("wf", OK)
            counts.observe("wf", 0.002)
        counts.count("wf", RETRY)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts.count("other", ERROR)
    assert sample(reg, "substantial_steps_total", workflow="wf", outcome="ok") == 4000
    assert sample(reg, "substantial_steps_total", workflow="wf", outcome="retry") == 4
    assert sample(reg, "substantial_steps_total", workflow="wf", outcome="error") == 0
    assert sample(reg, "substantial_steps_total", workflow="other", outcome="error") == 1
    assert sample(reg, "substantial_step_duration_seconds_count", workflow="wf") == 4000
    total = sample(reg, "substantial_step_duration_seconds_sum", workflow="wf")
    assert total is not None and abs(total - 8.0) < 1e-6


def test_a_duration_lands_in_every_bucket_whose_bound_is_at_least_it() -> None:
    reg = CollectorRegistry()
    counts = StepCounts()
    reg.register(counts)
    counts.observe("wf", 0.005)  # exactly a bound: counted in it
    counts.observe("wf", 0.0051)
    counts.observe("wf", 1000.0)  # beyond the last bound: +Inf only

    def bucket(le: str) -> float | None:
        return sample(reg, "substantial_step_duration_seconds_bucket", workflow="wf", le=le)

    assert bucket("0.001") == 0
    assert bucket("0.005") == 1
    assert bucket("0.01") == 2
    assert bucket(str(float(STEP_BUCKETS[-1]))) == 2
    assert bucket("+Inf") == 3
