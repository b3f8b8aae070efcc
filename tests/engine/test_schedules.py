"""Schedules: ``@workflow(schedule=...)`` / ``@workflow(every=...)``. Each tick starts
one run, its id made of the workflow and the tick; overlap policies; catch-up of
ticks missed while no worker ran; ``Conductor.schedules()``. On the virtual clock,
on every store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from substantial import Context, RunStatus, workflow
from substantial.backends import Backend, RunQuery
from substantial.testing import TestEnvironment

HOUR = timedelta(hours=1)
START = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)  # half a minute past a whole hour


@workflow(every=HOUR)
async def hourly(c: Context, scheduled_at: datetime) -> str:
    return scheduled_at.isoformat()


@workflow(every=HOUR, overlap="skip")
async def slow_skip(c: Context) -> None:
    await c.sleep(timedelta(minutes=90))


@workflow(every=HOUR, overlap="buffer_one")
async def slow_buffer(c: Context) -> None:
    await c.sleep(timedelta(minutes=150))


@workflow(every=HOUR, overlap="allow")
async def slow_allow(c: Context) -> None:
    await c.sleep(timedelta(minutes=90))


@workflow(every=HOUR, overlap="allow", catchup=timedelta(hours=5))
async def catching_up(c: Context) -> None:
    return None


@workflow(schedule="0 3 * * *", tz="Europe/Paris")
async def nightly(c: Context) -> None:
    return None


async def runs_of(env: TestEnvironment, name: str) -> list[Any]:
    found = await env.conductor.journal.list_runs(RunQuery(workflow=name))
    return sorted(found, key=lambda r: r.run_id)


async def test_each_tick_starts_one_run_named_by_its_tick(backend: Backend) -> None:
    async with TestEnvironment(hourly, backend=backend, start=START) as env:
        await env.advance(timedelta(hours=3))
        runs = await runs_of(env, "hourly")
        assert [r.run_id for r in runs] == [
            "hourly@2030-01-01T01:00:00+00:00",
            "hourly@2030-01-01T02:00:00+00:00",
            "hourly@2030-01-01T03:00:00+00:00",
        ]
        assert all(r.status == RunStatus.COMPLETED for r in runs)
        assert runs[0].result == "2030-01-01T01:00:00+00:00"  # scheduled_at, a datetime


async def test_overlap_skip_buffer_one_and_allow(backend: Backend) -> None:
    async with TestEnvironment(
        slow_skip, slow_buffer, slow_allow, backend=backend, start=START
    ) as env:
        await env.advance(timedelta(hours=4, minutes=10))
        skip = [r.run_id[-14:-6] for r in await runs_of(env, "slow_skip")]
        # 01:00 runs until 02:30, so 02:00 is skipped; 03:00 until 04:30: 04:00 skipped
        assert skip == ["01:00:00", "03:00:00"]
        buffered = [r.run_id[-14:-6] for r in await runs_of(env, "slow_buffer")]
        # 01:00 runs until 03:30; 02:00 and 03:00 come meanwhile: the latest (03:00)
        # is held and starts when 01:00 ends; 04:00 comes while 03:00 runs: held
        assert buffered == ["01:00:00", "03:00:00"]
        allowed = [r.run_id[-14:-6] for r in await runs_of(env, "slow_allow")]
        assert allowed == ["01:00:00", "02:00:00", "03:00:00", "04:00:00"]


async def test_ticks_missed_are_caught_up_as_far_back_as_asked(backend: Backend) -> None:
    async with TestEnvironment(catching_up, backend=backend, start=START) as env:
        await env.run_until_idle()
        ticks = [r.run_id[-14:-6] for r in await runs_of(env, "catching_up")]
        # five hours back from 00:00:30: 20:00 .. 00:00 of the day before and this one
        assert ticks == ["20:00:00", "21:00:00", "22:00:00", "23:00:00", "00:00:00"]


def test_schedules_lists_the_next_ticks_in_their_time_zone() -> None:
    from substantial import Conductor

    c = Conductor("memory://", clock=lambda: START.timestamp())
    c.register(nightly, hourly)
    nxt = {s.workflow: s for s in c.schedules(count=2)}
    assert nxt["hourly"].next_ticks == [
        START.replace(hour=1, second=0),
        START.replace(hour=2, second=0),
    ]
    # 03:00 in Paris is 02:00 UTC in winter
    assert nxt["nightly"].next_ticks[0] == datetime(2030, 1, 1, 2, 0, tzinfo=UTC)
    assert nxt["nightly"].next_run_ids[0] == "nightly@2030-01-01T02:00:00+00:00"
    assert nxt["nightly"].schedule == "0 3 * * * (Europe/Paris)"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "every day"}, "not a cron expression"),
        ({"schedule": "* * * * *", "every": 5}, "not both"),
        ({"every": 0}, "positive duration"),
        ({"every": 5, "tz": "Mars/Olympus"}, "not a time zone"),
        ({"every": 5, "overlap": "queue"}, "must be one of skip, buffer_one, allow"),
        ({"every": 5, "catchup": -1}, "zero or more"),
    ],
)
def test_a_bad_schedule_is_refused_when_declared(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        workflow(**kwargs)(hourly.fn)
