"""TestEnvironment: workflows on a virtual clock. Time stands still while a run can
make progress and skips to the next timer when every run waits and a client
awaits a result; ``advance`` moves it by hand; stubs replace saves' effects."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from substantial import Conductor, Context, Retry, RunStatus, SaveFailed, workflow
from substantial.backends.memory import MemoryBackend
from substantial.testing import TestEnvironment

DAY = 86_400.0
attempts: dict[str, int] = {}


class Flaky(Exception):
    pass


@workflow()
async def month_long(c: Context, sleep: float, timeout: float, backoff: float) -> dict[str, Any]:
    """A 30-day sleep, a receive that times out after 7 days, and a step whose two
    failures are retried after an hour and two (at the durations given)."""
    start = await c.now()
    await c.sleep(sleep)
    try:
        answer = await c.receive("answer", timeout=timeout)
    except TimeoutError:
        answer = "no answer"

    def fetch() -> str:
        attempts[c.run_id] = attempts.get(c.run_id, 0) + 1
        if attempts[c.run_id] < 3:
            raise Flaky(f"try {attempts[c.run_id]}")
        return "fetched"

    policy = Retry(
        max_attempts=5, backoff=timedelta(seconds=backoff), max_backoff=timedelta(days=1)
    )
    fetched = await c.save(fetch, retry=policy, name="fetch")
    end = await c.now()
    return {"answer": answer, "fetched": fetched, "days": (end - start).total_seconds() / DAY}


def shape(entries: list[Any]) -> list[tuple[Any, ...]]:
    """A timeline without its times: what must not depend on the clock."""
    return [(e.kind, e.name, e.attempts, e.error) for e in entries if e.kind not in ("now",)]


async def test_a_month_of_timers_passes_at_once_with_the_log_a_real_clock_gives() -> None:
    attempts.clear()
    wall = time.perf_counter()
    async with TestEnvironment(month_long) as env:
        before = env.now()
        h = await env.conductor.start(
            month_long, {"sleep": 30 * DAY, "timeout": 7 * DAY, "backoff": 3600.0}
        )
        out = await h.result(timeout=10)
        virtual = await env.history(h.run_id)
        elapsed = env.now() - before
    print(f"37 days and 3 hours of timers in {time.perf_counter() - wall:.3f} s of wall time")
    assert out["answer"] == "no answer" and out["fetched"] == "fetched"
    # 30 d + 7 d + 1 h + 2 h of backoff, exactly: time jumped to each timer
    assert out["days"] == pytest.approx(37 + 3 / 24)
    assert elapsed >= timedelta(days=37, hours=3)

    attempts.clear()  # the same workflow on the wall clock, at a thousandth of the durations
    c = Conductor(MemoryBackend())
    c.register(month_long)
    agent = c.run(handle_sigterm=False)
    try:
        h = await c.start(month_long, {"sleep": 0.03, "timeout": 0.02, "backoff": 0.01})
        real = await c.history(h.run_id) if await h.result(timeout=10) else None
    finally:
        agent.cancel()
        await agent
        await c.close()
    assert real is not None
    assert shape(virtual) == shape(real.entries)


@workflow()
async def approval(c: Context) -> str:
    await c.sleep(timedelta(days=2))
    try:
        return str(await c.receive("approved", timeout=timedelta(days=7)))
    except TimeoutError:
        return "expired"


async def test_time_stands_still_until_advanced_so_a_test_can_act_between_timers() -> None:
    async with TestEnvironment(approval) as env:
        h = await env.conductor.start(approval)
        await env.run_until_idle()
        assert await h.status() == RunStatus.SUSPENDED  # asleep: time has not moved
        await env.advance(timedelta(days=1))
        await env.run_until_idle()
        [sleep] = [e for e in await env.history(h.run_id) if e.kind == "sleep"]
        assert not [e for e in await env.history(h.run_id) if e.kind == "receive"]
        await env.advance(timedelta(days=2))  # past the sleep: now waiting for the event
        assert [e.kind for e in await env.history(h.run_id)][-1] == "receive"
        await h.send("approved", "yes, on day 3")
        assert await h.result(timeout=10) == "yes, on day 3"
        assert sleep.value is not None


async def test_a_receive_timeout_expires_when_advanced_past_it() -> None:
    async with TestEnvironment(approval) as env:
        h = await env.conductor.start(approval)
        await env.advance(timedelta(days=9, seconds=1))
        assert await h.status() == RunStatus.COMPLETED
        assert await h.result() == "expired"


async def test_the_clock_starts_where_asked_and_runs_record_it() -> None:
    @workflow(name="what_time")
    async def what_time(c: Context) -> str:
        return (await c.now()).isoformat()

    start = datetime(2030, 1, 1, tzinfo=UTC)
    async with TestEnvironment(what_time, start=start) as env:
        h = await env.conductor.start(what_time)
        assert await h.result(timeout=10) == start.isoformat()
        assert env.now() == start  # nothing waited: time never moved
    with pytest.raises(ValueError, match="aware datetime"):
        TestEnvironment(what_time, start=datetime(2030, 1, 1))


charged: list[int] = []


@workflow()
async def checkout(c: Context, amount: int) -> Any:
    def charge() -> dict[str, Any]:
        charged.append(amount)
        return {"charged": amount}

    return await c.save(
        charge, retry=Retry(max_attempts=3, backoff=timedelta(hours=1)), name="charge"
    )


async def test_a_stubbed_value_is_recorded_in_place_of_the_effect() -> None:
    charged.clear()
    async with TestEnvironment(checkout) as env:
        env.stub("charge", {"charged": 0, "stub": True})
        h = await env.conductor.start(checkout, {"amount": 5})
        assert await h.result(timeout=10) == {"charged": 0, "stub": True}
        [save] = [e for e in await env.history(h.run_id) if e.kind == "save"]
        assert save.name == "charge" and save.value == {"charged": 0, "stub": True}
        env.unstub("charge")
        h2 = await env.conductor.start(checkout, {"amount": 7})
        assert await h2.result(timeout=10) == {"charged": 7}
    assert charged == [7]  # the real effect ran only once it was unstubbed


async def test_a_stubbed_exception_is_retried_by_the_policy_then_fatal() -> None:
    charged.clear()
    calls = 0

    def declined() -> Any:
        nonlocal calls
        calls += 1
        raise Flaky(f"card declined ({calls})")

    async with TestEnvironment(checkout) as env:
        env.stub("charge", declined)
        h = await env.conductor.start(checkout, {"amount": 5})
        with pytest.raises(Exception, match=r"card declined \(3\)"):
            await h.result(timeout=10)
        [save] = [e for e in await env.history(h.run_id) if e.kind == "save"]
        assert save.attempts == 3 and save.failed and save.error == "card declined (3)"
        assert env.now() - datetime.fromtimestamp(0, UTC) > timedelta(0)
    assert calls == 3 and charged == []


async def test_an_exception_class_as_a_stub_fails_every_attempt() -> None:
    @workflow(name="guarded")
    async def guarded(c: Context) -> str:
        try:
            return str(await c.save(lambda: "real", name="lookup", retry=Retry(max_attempts=2)))
        except SaveFailed as exc:
            return f"{exc.error_type} after {exc.attempts}"

    async with TestEnvironment(guarded) as env:
        env.stub("lookup", Flaky)
        h = await env.conductor.start(guarded)
        assert await h.result(timeout=10) == "Flaky after 2"


async def test_the_environment_is_a_clean_context_manager() -> None:
    env = TestEnvironment(approval)
    with pytest.raises(RuntimeError, match="async with"):
        _ = env.conductor
    async with env:
        await env.conductor.start(approval)
    with pytest.raises(RuntimeError, match="async with"):
        _ = env.conductor
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("substantial")]


@workflow()
async def watcher(c: Context) -> str:
    state = {"ready": False}
    c.handle("ready", lambda _: state.update(ready=True))
    try:
        await c.ensure(lambda: state["ready"], poll=timedelta(hours=1), timeout=timedelta(days=2))
    except TimeoutError:
        return "gave up"
    return "ready"


async def test_ensure_polls_and_times_out_on_the_virtual_clock() -> None:
    async with TestEnvironment(watcher) as env:
        t0 = env.now()
        h = await env.conductor.start(watcher)
        assert await h.result(timeout=10) == "gave up"  # 48 hourly polls, then the timeout
        assert env.now() - t0 == timedelta(days=2)
        ready = await env.conductor.start(watcher)
        await env.advance(timedelta(hours=5))
        await ready.send("ready")
        assert await ready.result(timeout=10) == "ready"
