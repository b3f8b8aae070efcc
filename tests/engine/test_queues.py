"""Queues with limits, as a user declares them (``Conductor.queue``) and starts
runs on them (``start(priority=, concurrency_key=)``), on every store. The
store's side of each limit is in tests/conformance/test_queue_limits.py; the
limits across worker processes in tests/integration/test_queue_processes.py."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest

from substantial import ClientError, Conductor, ConfigurationError, Context, Queue, workflow
from substantial.testing import TestEnvironment

ORDER: list[str] = []
INSIDE: Counter[str | None] = Counter()
PEAK: dict[str | None, int] = {}
ALL = "all"


@workflow()
async def job(c: Context, name: str) -> str:
    def record() -> str:
        ORDER.append(name)
        return name

    return await c.save(record)


@workflow()
async def critical(c: Context, key: str | None, hold: float) -> int:
    """Counts how many runs are inside this step at once, per key and in all."""

    async def inside() -> int:
        for group in (key, ALL):
            INSIDE[group] += 1
            PEAK[group] = max(PEAK.get(group, 0), INSIDE[group])
        try:
            await asyncio.sleep(hold)
        finally:
            for group in (key, ALL):
                INSIDE[group] -= 1
        return 1

    return await c.save(inside)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    ORDER.clear()
    INSIDE.clear()
    PEAK.clear()


async def test_priority_runs_lowest_number_first(conductor: Conductor) -> None:
    conductor.register(job)
    conductor.queue("jobs", priority=True)
    for name, prio in [("c", 3), ("a", 1), ("d", 5), ("first", 0), ("b", 2)]:
        await conductor.start(job, {"name": name}, queue="jobs", priority=prio)
    await conductor.run_until_idle(queues=["jobs"], concurrency=1)
    assert ORDER == ["first", "a", "b", "c", "d"]


async def test_global_concurrency_caps_runs_inside_their_step(conductor: Conductor) -> None:
    conductor.register(critical)
    conductor.queue("narrow", concurrency=2)
    handles = [
        await conductor.start(critical, {"key": None, "hold": 0.2}, queue="narrow")
        for _ in range(6)
    ]
    worker = conductor.run(queues=["narrow"], concurrency=6)
    try:
        assert [await h.result(timeout=60) for h in handles] == [1] * 6
    finally:
        worker.cancel()
        await worker
    assert PEAK[ALL] == 2


async def test_per_key_concurrency_one_run_per_key_at_once(conductor: Conductor) -> None:
    conductor.register(critical)
    conductor.queue("imports", concurrency=1)
    keys = ["acme", "globex", "initech", "umbrella"]
    handles = [
        await conductor.start(
            critical,
            {"key": keys[i % 4], "hold": 0.2},
            queue="imports",
            concurrency_key=keys[i % 4],
        )
        for i in range(20)
    ]
    worker = conductor.run(queues=["imports"], concurrency=20)
    try:
        assert sum([await h.result(timeout=120) for h in handles]) == 20
    finally:
        worker.cancel()
        await worker
    assert {k: PEAK[k] for k in keys} == dict.fromkeys(keys, 1)
    assert PEAK[ALL] > 1  # the keys do not wait for each other


async def test_a_rate_limited_queue_starts_runs_on_the_virtual_clock() -> None:
    """Held back by the rate, runs start as its window frees a start: the virtual
    clock jumps to those times, as it does to timers."""
    async with TestEnvironment(job, queues=("paced",)) as env:
        env.conductor.queue("paced", rate=(2, timedelta(minutes=1)))
        t0 = env.now()
        handles = [
            await env.conductor.start(job, {"name": str(i)}, queue="paced") for i in range(5)
        ]
        for h in handles:
            await h.result(timeout=30)
        started = [(await h.summary()).started_at for h in handles]
        offsets = sorted(round((s - t0).total_seconds()) for s in started if s is not None)
        assert offsets == [0, 0, 60, 60, 120]


def test_declaring_a_queue_returns_what_it_holds() -> None:
    conductor = Conductor("memory://")
    q = conductor.queue("payments", concurrency=3, rate=(10, 1), priority=True)
    assert q == Queue(
        name="payments", concurrency=3, rate=(10, timedelta(seconds=1)), priority=True
    )
    assert (
        conductor.queue("payments", concurrency=3, rate=(10, timedelta(seconds=1)), priority=True)
        == q
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be a whole number >= 1"),
        ({"concurrency": 2.5}, "concurrency must be a whole number >= 1"),
        ({"rate": 10}, r"rate must be \(limit, period\)"),
        ({"rate": (0, 1)}, "rate limit must be a whole number >= 1"),
        ({"rate": (5, 0)}, "rate period must be positive"),
        ({"rate": (5, "1s")}, "rate period must be a timedelta or seconds"),
        ({"priority": "yes"}, "priority must be True or False"),
    ],
)
def test_bad_queue_limits_are_configuration_errors(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Conductor("memory://").queue("q", **options)  # type: ignore[arg-type]


def test_one_queue_cannot_be_declared_with_two_sets_of_limits() -> None:
    conductor = Conductor("memory://")
    conductor.queue("q", concurrency=1)
    with pytest.raises(ConfigurationError, match="declared already with other limits"):
        conductor.queue("q", concurrency=2)


async def test_start_options_a_declared_queue_would_ignore_are_refused() -> None:
    async with Conductor("memory://") as conductor:
        conductor.queue("plain", concurrency=2)
        conductor.queue("unbounded", priority=True)
        with pytest.raises(ClientError, match="does not order by priority"):
            await conductor.start(job, {"name": "x"}, queue="plain", priority=1)
        with pytest.raises(ClientError, match="has no concurrency limit"):
            await conductor.start(job, {"name": "x"}, queue="unbounded", concurrency_key="k")
        with pytest.raises(ClientError, match="whole number"):
            await conductor.start(job, {"name": "x"}, queue="unbounded", priority=1.5)  # type: ignore[call-overload]
        with pytest.raises(ClientError, match="non-empty string"):
            await conductor.start(job, {"name": "x"}, queue="plain", concurrency_key="")
