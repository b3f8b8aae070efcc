"""Fixtures for the telemetry tests: a store per kind, a fresh metrics registry
and an in-memory span exporter, neither of them process-global.

The registry and the tracer provider are handed to ``telemetry.configure``, so
these tests never set OpenTelemetry's global provider (which can be set only
once per process) and never read prometheus_client's default registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from substantial import Conductor, telemetry

from ..backends import make_backend

KINDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=KINDS)
async def conductor(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Conductor]:
    async with make_backend(request.param, tmp_path) as backend:
        c = Conductor(backend)
        try:
            yield c
        finally:
            await c.close()


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    telemetry.configure(registry=reg)
    try:
        yield reg
    finally:
        telemetry.configure(registry=None)


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.configure(tracer_provider=tp)
    try:
        yield tp, exporter
    finally:
        telemetry.configure(tracer_provider=None)
        tp.shutdown()
