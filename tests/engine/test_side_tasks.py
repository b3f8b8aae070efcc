"""The worker's side tasks are supervised, its start and stop are logged, and a
store outage is waited out (issue 7, items 4, 6 and 7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from substantial import Conductor, Context, workflow
from substantial.backends import Backend, Claims
from substantial.backends.memory import MemoryBackend
from substantial.errors import BackendUnavailable

from ..backends import ALL, make_backend, url_for
from .helpers import worker

effects: list[str] = []


@workflow()
async def long_step(c: Context, seconds: float = 2.5) -> str:
    async def work() -> str:
        effects.append(c.run_id)
        await asyncio.sleep(seconds)  # the effect itself takes this long
        return "done"

    return await c.save(work)


async def test_a_failing_heartbeat_is_restarted_and_leases_are_kept(
    conductor: Conductor, caplog: pytest.LogCaptureFixture
) -> None:
    """The first renewal raises an unexpected error. The heartbeat is logged with
    its traceback and restarted at once, so a step lasting more than two leases
    still runs once, under the run's first and only claim."""
    effects.clear()
    real_renew = conductor.journal.renew
    calls = 0

    async def renew_failing_once(leases: Mapping[str, int], lease: float) -> set[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("heartbeat bug")
        return await real_renew(leases, lease)

    conductor.journal.renew = renew_failing_once  # type: ignore[method-assign]
    conductor.register(long_step)
    with caplog.at_level(logging.ERROR, logger="substantial"):
        async with worker(conductor, lease=1.0):
            h = await conductor.start(long_step)
            assert await h.result(timeout=30) == "done"
    assert effects == [h.run_id]  # never taken over and run again
    run = await conductor.journal.get(h.run_id)
    assert run.lease_token == 1  # claimed once
    failed = [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert calls >= 3  # renewals went on after the failure


@workflow()
async def gated(c: Context) -> str:
    async def work() -> str:
        await release_gated.wait()
        return "done"

    return await c.save(work)


release_gated = asyncio.Event()


async def test_a_slow_claim_pass_renews_what_it_claimed_at_once() -> None:
    """A claim pass that took a sixth of the lease or more is followed by a
    renewal right away, not at the heartbeat's next period: the runs it claimed
    first have been on their leases since the pass began. The store's clock moves
    11 s during the claim (lease 60 s, so the period is 20 s of real time)."""
    release_gated.clear()
    now = [1_000_000.0]
    c = Conductor(MemoryBackend(), clock=lambda: now[0])
    c.register(gated)
    real_claim, real_renew = c.journal.claim, c.journal.renew
    renewed: asyncio.Queue[set[str]] = asyncio.Queue()

    async def slow_claim(**kw: Any) -> Claims:
        got = await real_claim(**kw)
        if got:  # the pass takes its time (the heartbeat's first beat passes meanwhile)
            await asyncio.sleep(0.05)
            now[0] += 11
        return got

    async def recording_renew(leases: Mapping[str, int], lease: float) -> set[str]:
        renewed.put_nowait(set(leases))
        return await real_renew(leases, lease)

    c.journal.claim = slow_claim  # type: ignore[method-assign]
    c.journal.renew = recording_renew  # type: ignore[method-assign]
    async with worker(c, lease=60):
        h = await c.start(gated)
        held = await asyncio.wait_for(renewed.get(), timeout=10)  # the period is 20 s
        assert held == {h.run_id}
        release_gated.set()
        assert await h.result(timeout=10) == "done"
    await c.close()


@workflow()
async def quick(c: Context) -> int:
    return int(await c.save(lambda: 7))


async def test_start_and_stop_are_logged_with_what_the_worker_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = Conductor(MemoryBackend())
    c.register(quick, long_step)
    with caplog.at_level(logging.INFO, logger="substantial.worker"):
        async with worker(c, queues=["default", "bulk"], concurrency=7, lease=12):
            h = await c.start(quick)
            assert await h.result(timeout=10) == 7
    await c.close()
    started = next(r for r in caplog.records if "started" in r.getMessage())
    text = started.getMessage()
    assert started.levelno == logging.INFO
    for part in ("MemoryBackend", "default, bulk", "long_step, quick", "concurrency 7", "12.0s"):
        assert part in text
    assert any(r.getMessage().endswith("stopped") for r in caplog.records)


async def test_the_start_up_log_names_the_store_without_its_password(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """PostgreSQL on loopback trusts every password, so one can be given and must
    not show up in the log."""
    url, _ = url_for("postgres", tmp_path)
    url = url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@")
    c = Conductor(url)
    c.register(quick)
    try:
        with caplog.at_level(logging.INFO, logger="substantial.worker"):
            async with worker(c):
                assert await (await c.start(quick)).result(timeout=10) == 7
    finally:
        drop = getattr(c.backend, "drop_everything", None)
        if drop is not None:
            await drop()
        await c.close()
    started = next(r for r in caplog.records if "started" in r.getMessage())
    assert "postgresql://postgres@127.0.0.1:5432/test" in started.getMessage()
    assert not [r for r in caplog.records if "hunter2" in r.getMessage()]


class Flaky:
    """A real store behind a switch: while ``down`` every call fails as an
    unreachable store does."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.down = True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in ("subscribe", "poll_interval") or not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise BackendUnavailable("the test's store is down")
            return await attr(*args, **kwargs)

        return call

    @property
    def poll_interval(self) -> float | None:
        return 0.2  # hints published while down are lost: the poll covers them


@pytest.fixture(params=ALL)
async def real_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with make_backend(request.param, tmp_path) as backend:
        yield backend


async def test_a_worker_started_while_its_store_is_down_waits_and_logs_twice(
    real_store: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = Flaky(real_store)
    c = Conductor(store)
    c.register(quick)
    with caplog.at_level(logging.DEBUG, logger="substantial"):
        async with worker(c) as task:
            for _ in range(20):  # the worker keeps retrying, it does not die
                await asyncio.sleep(0.05)
                assert not task.done()
            store.down = False
            client = Conductor(real_store)
            h = await client.start(quick)
            assert await c.handle(h.run_id).result(timeout=10) == 7
    await c.close()
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and "store" in r.getMessage()]
    down = [r for r in lines if "unreachable" in r.getMessage()]
    back = [r for r in lines if "reachable again" in r.getMessage()]
    assert len(down) == 1 and down[0].levelno == logging.WARNING
    assert len(back) == 1


async def test_result_rides_out_an_outage_within_its_timeout(real_store: Backend) -> None:
    store = Flaky(real_store)
    store.down = False
    c = Conductor(store)
    c.register(quick)
    h = await c.start(quick)
    store.down = True
    waiting = asyncio.create_task(h.result(timeout=30))
    for _ in range(10):
        await asyncio.sleep(0.05)
        assert not waiting.done()  # not a BackendUnavailable less than a second in
    store.down = False
    async with worker(c):
        assert await waiting == 7
    await c.close()
