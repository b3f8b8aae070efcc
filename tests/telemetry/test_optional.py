"""Telemetry is optional and inert: the engine imports neither library when it is
imported, runs normally without them, and uses an SDK the usual way (the
global tracer provider) when the application sets one.

Each case runs in a fresh interpreter: which modules are imported, and the
global tracer provider (settable once per process), are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

RUN_ONE = """
import asyncio
from substantial import Conductor, Context, workflow
from substantial.backends.memory import MemoryBackend

@workflow(name="opt.two_steps")
async def two_steps(c: Context) -> int:
    a = await c.save(lambda: 1)
    return a + await c.save(lambda: 2)

async def run_one() -> int:
    c = Conductor(MemoryBackend())
    c.register(two_steps)
    task = c.run(handle_sigterm=False)
    try:
        return await (await c.start(two_steps)).result(timeout=20)
    finally:
        task.cancel()
        await task
"""


def python(*parts: str) -> Any:
    """Run the code ``parts`` in a fresh interpreter on this checkout; its last
    stdout line, as JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("OTEL_PYTHON_TRACER_PROVIDER", None)
    proc = subprocess.run(
        [sys.executable, "-c", "\n".join(textwrap.dedent(p) for p in parts)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_engine_imports_neither_optional_library() -> None:
    got = python(
        """
        import json, sys
        import substantial, substantial.worker, substantial.conductor, substantial.telemetry
        print(json.dumps(sorted(
            m for m in sys.modules
            if m.split(".")[0] in ("prometheus_client", "opentelemetry")
        )))
        """
    )
    assert got == []


def test_without_the_libraries_runs_complete_and_telemetry_says_it_is_off() -> None:
    got = python(
        """
        import importlib.abc, json, sys

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("prometheus_client", "opentelemetry"):
                    raise ImportError(f"no module named {name!r}")
                return None

        sys.meta_path.insert(0, Missing())
        """,
        RUN_ONE,
        """
        from substantial import ConfigurationError, telemetry
        result = asyncio.run(run_one())
        try:
            telemetry.render_metrics()
            refused = ""
        except ConfigurationError as exc:
            refused = str(exc)
        print(json.dumps({
            "result": result,
            "metrics": telemetry.metrics_enabled(),
            "tracing": telemetry.tracing_enabled(),
            "refused": refused,
        }))
        """,
    )
    assert got["result"] == 3
    assert got["metrics"] is False and got["tracing"] is False
    assert "substantial[metrics]" in got["refused"]


def test_with_the_api_but_no_sdk_no_span_is_made() -> None:
    got = python(
        RUN_ONE,
        """
        import json
        from opentelemetry import trace
        from substantial import telemetry
        made = []

        def spy(cls, method):
            real = getattr(cls, method)

            def record(self, *a, **kw):
                made.append(f"{cls.__name__}.{method}")
                return real(self, *a, **kw)

            setattr(cls, method, record)

        spy(trace.ProxyTracerProvider, "get_tracer")
        spy(trace.ProxyTracer, "start_span")
        spy(trace.ProxyTracer, "start_as_current_span")
        result = asyncio.run(run_one())
        print(json.dumps({"result": result, "tracing": telemetry.tracing_enabled(),
                          "made": made}))
        """,
    )
    assert got == {"result": 3, "tracing": False, "made": []}


def test_an_sdk_set_as_the_global_provider_receives_the_spans() -> None:
    got = python(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        """,
        RUN_ONE,
        """
        import json
        async def traced() -> int:
            with trace.get_tracer("app").start_as_current_span("caller"):
                return await run_one()
        result = asyncio.run(traced())
        spans = exporter.get_finished_spans()
        caller = [s for s in spans if s.name == "caller"][0]
        print(json.dumps({
            "result": result,
            "names": sorted(s.name.split(" ")[0] for s in spans),
            "one_trace": len({s.context.trace_id for s in spans}) == 1,
            "run_parent_is_caller": [
                s.parent.span_id == caller.context.span_id
                for s in spans if s.name.startswith("substantial.run")
            ],
        }))
        """,
    )
    assert got["result"] == 3
    assert got["names"] == ["caller", "substantial.run", "substantial.step", "substantial.step"]
    assert got["one_trace"] is True
    assert got["run_parent_is_caller"] == [True]


def test_a_global_provider_replaced_between_runs_gets_the_later_spans() -> None:
    """Test suites reset OpenTelemetry's global provider between tests (as its
    own test utilities do); the next run's spans go to the new provider."""
    got = python(
        RUN_ONE,
        """
        import json
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.util._once import Once

        def fresh_global() -> InMemorySpanExporter:
            trace._TRACER_PROVIDER_SET_ONCE = Once()
            trace._TRACER_PROVIDER = None
            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            return exporter

        first = fresh_global()
        asyncio.run(run_one())
        second = fresh_global()
        asyncio.run(run_one())
        print(json.dumps([
            sorted(s.name.split(" ")[0] for s in e.get_finished_spans()) for e in (first, second)
        ]))
        """,
    )
    names = ["substantial.run", "substantial.start", "substantial.step", "substantial.step"]
    assert got == [names, names]
