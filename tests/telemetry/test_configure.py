"""Where metrics are counted can change (tests, applications with their own
registry) without losing counts or breaking a run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from substantial import telemetry


@pytest.fixture(autouse=True)
def _default_after() -> Iterator[None]:
    yield
    telemetry.configure(registry=None)


def claims(reg: CollectorRegistry) -> float | None:
    return reg.get_sample_value("substantial_claims_total")


def test_a_registry_configured_again_keeps_its_counts() -> None:
    before = claims(REGISTRY) or 0.0
    telemetry.claimed()  # makes the families on the default registry
    mine = CollectorRegistry()
    telemetry.configure(registry=mine)
    telemetry.claimed()
    telemetry.configure(registry=None)  # back to the default: same families, no clash
    telemetry.claimed()
    telemetry.configure(registry=mine)
    telemetry.claimed()
    assert claims(mine) == 2
    assert claims(REGISTRY) == before + 2


def test_names_taken_on_the_registry_turn_metrics_off_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    taken = CollectorRegistry()
    Counter("substantial_claims", "someone else's", registry=taken)
    telemetry.configure(registry=taken)
    telemetry.claimed()  # must not raise into the worker
    assert not telemetry.metrics_enabled()
    assert claims(taken) == 0
    assert "metrics are off" in caplog.text
