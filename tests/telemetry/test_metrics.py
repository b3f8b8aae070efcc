"""Prometheus metrics scraped after known runs give the right counts.

Each test counts on a fresh registry (see conftest), so every figure is what
that test's runs produced: runs started and ended by status, steps by outcome
(a save that fails once then succeeds is one retry and one ok), claims,
replays (``hot_wait=0`` evicts a sleeping run, so it resumes by replay) and
the active-runs gauge back at zero once the runs are over."""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from substantial import Conductor, Context, Retry, RunFailed, telemetry, workflow

from ..engine.helpers import eventually, worker
from .helpers import serving

FAST = Retry(max_attempts=3, backoff=timedelta(milliseconds=10))
calls: dict[str, int] = {}


def exposed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    got = reg.get_sample_value(name, labels)
    return 0.0 if got is None else got


async def ok_step() -> str:
    return "ok"


async def fails_once() -> str:
    calls["fails_once"] = calls.get("fails_once", 0) + 1
    if calls["fails_once"] == 1:
        raise ConnectionError("flaky")
    return "second time"


async def always_fails() -> str:
    raise ValueError("broken")


@workflow(name="tm.two_steps")
async def two_steps(c: Context) -> str:
    a = await c.save(ok_step)
    b = await c.save(ok_step)
    return a + b


@workflow(name="tm.flaky")
async def flaky(c: Context) -> str:
    calls["fails_once"] = 0
    return await c.save(fails_once, retry=FAST)


@workflow(name="tm.broken")
async def broken(c: Context) -> str:
    return await c.save(always_fails, retry=Retry(max_attempts=2, backoff=timedelta(0)))


@workflow(name="tm.sleeper")
async def sleeper(c: Context) -> str:
    await c.save(ok_step)
    await c.sleep(0.05)
    return await c.save(ok_step)


async def test_runs_and_steps_are_counted_by_workflow_status_and_outcome(
    conductor: Conductor, registry: CollectorRegistry
) -> None:
    conductor.register(two_steps, flaky, broken)
    async with serving(conductor, registry):
        h1 = await conductor.start(two_steps)
        h2 = await conductor.start(flaky)
        h3 = await conductor.start(broken)
        assert await h1.result(timeout=20) == "okok"
        assert await h2.result(timeout=20) == "second time"
        with pytest.raises(RunFailed, match="broken"):
            await h3.result(timeout=20)
    for wf in ("tm.two_steps", "tm.flaky", "tm.broken"):
        assert value(registry, "substantial_runs_started_total", workflow=wf) == 1
    ended = "substantial_runs_ended_total"
    assert value(registry, ended, workflow="tm.two_steps", status="COMPLETED") == 1
    assert value(registry, ended, workflow="tm.flaky", status="COMPLETED") == 1
    assert value(registry, ended, workflow="tm.broken", status="FAILED") == 1
    assert value(registry, ended, workflow="tm.broken", status="COMPLETED") == 0
    steps = "substantial_steps_total"
    assert value(registry, steps, workflow="tm.two_steps", outcome="ok") == 2
    assert value(registry, steps, workflow="tm.two_steps", outcome="retry") == 0
    assert value(registry, steps, workflow="tm.flaky", outcome="retry") == 1
    assert value(registry, steps, workflow="tm.flaky", outcome="ok") == 1
    assert value(registry, steps, workflow="tm.broken", outcome="retry") == 1
    assert value(registry, steps, workflow="tm.broken", outcome="error") == 1
    assert value(registry, steps, workflow="tm.broken", outcome="ok") == 0
    # one duration per executed attempt, one run duration per ended run
    step_count = "substantial_step_duration_seconds_count"
    assert value(registry, step_count, workflow="tm.two_steps") == 2
    assert value(registry, step_count, workflow="tm.flaky") == 2
    assert value(registry, step_count, workflow="tm.broken") == 2
    for wf in ("tm.two_steps", "tm.flaky", "tm.broken"):
        assert value(registry, "substantial_run_duration_seconds_count", workflow=wf) == 1
    # every stretch began with a claim: at least one per run, and the retries'
    # short backoffs stay in place (default hot_wait), so nothing replays
    assert value(registry, "substantial_claims_total") == 3
    assert value(registry, "substantial_replays_total") == 0
    assert value(registry, "substantial_leases_lost_total") == 0
    assert value(registry, "substantial_active_runs") == 0


async def test_an_evicted_run_resumes_by_a_replay_that_counts_no_step_again(
    conductor: Conductor, registry: CollectorRegistry
) -> None:
    conductor.register(sleeper)
    async with serving(conductor, registry, hot_wait=0):  # the sleep evicts the run
        h = await conductor.start(sleeper)
        assert await h.result(timeout=20) == "ok"
    assert value(registry, "substantial_runs_started_total", workflow="tm.sleeper") == 1
    assert value(registry, "substantial_claims_total") == 2
    assert value(registry, "substantial_replays_total") == 1
    # the first save was replayed, not executed, in the second stretch
    assert value(registry, "substantial_steps_total", workflow="tm.sleeper", outcome="ok") == 2
    assert value(registry, "substantial_step_duration_seconds_count", workflow="tm.sleeper") == 2
    ended = "substantial_runs_ended_total"
    assert value(registry, ended, workflow="tm.sleeper", status="COMPLETED") == 1
    assert value(registry, "substantial_active_runs") == 0


@workflow(name="tm.holds")
async def holds(c: Context) -> str:
    return await c.save(wait_for_gate)


gate: list[asyncio.Event] = []


async def wait_for_gate() -> str:
    await gate[0].wait()
    return "opened"


async def test_the_active_gauge_counts_runs_being_driven(
    conductor: Conductor, registry: CollectorRegistry
) -> None:
    gate[:] = [asyncio.Event()]
    conductor.register(holds)
    async with serving(conductor, registry):
        handles = [await conductor.start(holds) for _ in range(3)]
        await eventually(lambda: value(registry, "substantial_active_runs") == 3)
        gate[0].set()
        for h in handles:
            assert await h.result(timeout=20) == "opened"
    assert value(registry, "substantial_active_runs") == 0


async def test_the_exposition_names_every_metric_and_is_served_on_a_port(
    conductor: Conductor, registry: CollectorRegistry
) -> None:
    conductor.register(two_steps)
    async with serving(conductor, registry):
        await (await conductor.start(two_steps)).result(timeout=20)
    body, content_type = telemetry.render_metrics()
    assert content_type.startswith("text/plain")
    samples = exposed(body.decode())
    for name, labels, expected in (
        ("substantial_runs_started_total", {"workflow": "tm.two_steps"}, 1),
        ("substantial_runs_ended_total", {"workflow": "tm.two_steps", "status": "COMPLETED"}, 1),
        ("substantial_steps_total", {"workflow": "tm.two_steps", "outcome": "ok"}, 2),
        ("substantial_step_duration_seconds_count", {"workflow": "tm.two_steps"}, 2),
        ("substantial_run_duration_seconds_count", {"workflow": "tm.two_steps"}, 1),
        ("substantial_claims_total", {}, 1),
        ("substantial_leases_lost_total", {}, 0),
        ("substantial_replays_total", {}, 0),
        ("substantial_active_runs", {}, 0),
    ):
        assert samples.get((name, tuple(sorted(labels.items())))) == expected, name
    server = telemetry.serve_metrics(0)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return str(resp.read().decode())

        served = await asyncio.to_thread(scrape)
    finally:
        server.close()
    key = ("substantial_runs_started_total", (("workflow", "tm.two_steps"),))
    assert exposed(served)[key] == 1


@workflow(name="tm.handed_back")
async def handed_back(c: Context) -> str:
    return await c.save(wait_for_gate)


async def test_a_run_handed_back_and_claimed_again_is_started_once(
    conductor: Conductor, registry: CollectorRegistry
) -> None:
    gate[:] = [asyncio.Event()]
    conductor.register(handed_back)
    async with worker(conductor):  # stopped with the run mid-step: handed back
        h = await conductor.start(handed_back)
        await eventually(lambda: value(registry, "substantial_active_runs") == 1)
    assert value(registry, "substantial_active_runs") == 0
    gate[0].set()
    async with serving(conductor, registry):  # another worker takes it over
        assert await h.result(timeout=20) == "opened"
    assert value(registry, "substantial_claims_total") == 2
    assert value(registry, "substantial_runs_started_total", workflow="tm.handed_back") == 1
    assert value(registry, "substantial_replays_total") == 0  # nothing was recorded to replay
    ended = "substantial_runs_ended_total"
    assert value(registry, ended, workflow="tm.handed_back", status="COMPLETED") == 1
