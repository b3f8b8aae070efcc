"""Tracing costs nothing in a process that does not trace: OpenTelemetry is
used once the application has imported it, never imported by Substantial."""

from __future__ import annotations

import subprocess
import sys

RUN_ONE = """
import asyncio, sys
from substantial import Conductor, Context, workflow
{before}

@workflow()
async def one(c: Context) -> int:
    return await c.save(lambda: 1)

async def main() -> None:
    async with Conductor("memory://") as c:
        c.register(one)
        task = c.run(handle_sigterm=False)
        assert await (await c.start(one)).result(timeout=10) == 1
        task.cancel()
        await task
        from substantial import telemetry
        print("opentelemetry.trace" in sys.modules, telemetry.tracing_enabled())

asyncio.run(main())
"""


def run_one(before: str = "") -> str:
    done = subprocess.run(
        [sys.executable, "-c", RUN_ONE.format(before=before)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_a_process_that_does_not_trace_never_imports_opentelemetry() -> None:
    assert run_one() == "False False"


def test_an_application_that_configures_an_sdk_is_traced() -> None:
    sdk = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "trace.set_tracer_provider(TracerProvider())"
    )
    assert run_one(sdk) == "True True"
