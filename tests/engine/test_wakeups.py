"""No lost wake-ups (guarantee 7): whatever order the worker, the client and the
subscription start in, a run made due is picked up without waiting for a poll.

Every store here runs with polling switched off (``NoPoll``): a run that only a
poll would find never finishes, and the test fails on its timeout. Only the
cross-process case keeps the local stores' poll, their one channel across
processes.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from substantial import Conductor, Context, RunFailed, workflow
from substantial.backends import Backend, Claims

from ..backends import ALL, SERVERS, make_backend, url_for
from .helpers import worker


@workflow()
async def hello(c: Context, name: str = "world") -> str:
    return await c.save(lambda: f"hello {name}")


class NoPoll:
    """A store as it is, except that it never asks to be polled."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def poll_interval(self) -> float | None:
        return None


@pytest.fixture(params=ALL)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    async with make_backend(request.param, tmp_path) as backend:
        yield NoPoll(backend)


async def test_worker_first(store: Any) -> None:
    c = Conductor(store)
    c.register(hello)
    async with worker(c):
        h = await c.start(hello)
        assert await h.result(timeout=10) == "hello world"
    await c.close()


async def test_client_first(store: Any) -> None:
    c = Conductor(store)
    c.register(hello)
    h = await c.start(hello)
    async with worker(c):
        assert await h.result(timeout=10) == "hello world"
    await c.close()


async def test_worker_and_client_in_the_same_tick(store: Any) -> None:
    c = Conductor(store)
    c.register(hello)
    task = c.run(handle_sigterm=False)
    h = await asyncio.gather(c.start(hello))  # scheduled before the worker ever ran
    try:
        assert await h[0].result(timeout=10) == "hello world"
    finally:
        task.cancel()
        await task
        await c.close()


async def test_client_bounded_in_another_task(store: Any) -> None:
    """The issue's report: ``wait_for(start())`` right after ``run()`` hung on memory://."""
    c = Conductor(store)
    c.register(hello)
    async with worker(c):
        h = await asyncio.wait_for(c.start(hello, {"name": "task"}), 10)
        assert await asyncio.wait_for(h.result(), 10) == "hello task"
    await c.close()


async def test_another_conductor_as_the_client(store: Any) -> None:
    served = Conductor(store)
    served.register(hello)
    client = Conductor(store)
    async with worker(served):
        h = await client.start(hello, {"name": "other"})
        assert await h.result(timeout=10) == "hello other"
    await client.close()
    await served.close()


async def test_a_change_racing_the_subscription_being_set_up(store: Any) -> None:
    """A run created while the worker's subscription is being established: it
    falls before the subscription is live, so the worker's first claim, which
    waits for the subscription, must find it."""
    c = Conductor(store)
    c.register(hello)
    client = Conductor(store)
    real_hints = c.journal.hints
    made: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def hints_after_a_racing_start() -> AsyncIterator[str]:
        made.set_result(await client.start(hello, {"name": "race"}))
        async for hint in real_hints():
            yield hint

    c.journal.hints = hints_after_a_racing_start  # type: ignore[method-assign]
    async with worker(c):
        h = await made  # created while the subscription was being set up
        assert await h.result(timeout=10) == "hello race"
    await client.close()
    await c.close()


async def test_result_waiting_before_the_run_exists_elsewhere(store: Any) -> None:
    """result() on one Conductor while another one's worker finishes the run: the
    waiter subscribes before it reads, so the end is never missed."""
    served = Conductor(store)
    served.register(hello)
    client = Conductor(store)
    h = await client.start(hello)
    waiting = asyncio.create_task(h.result(timeout=10))
    await asyncio.sleep(0)
    async with worker(served):
        assert await waiting == "hello world"
    await client.close()
    await served.close()


async def test_a_run_this_process_ends_wakes_its_result_without_the_store_s_hint(
    store: Any,
) -> None:
    """The end of a run that this Conductor's own worker made durable wakes the
    Conductor's result() at once: the store's hint of the end (a round trip
    through PostgreSQL or Redis) is not waited for. Here it never comes: the
    hints stop once the run is claimed, and there is no poll."""
    c = Conductor(store)
    real_hints = c.journal.hints
    hinting = True
    stepping, go = asyncio.Event(), asyncio.Event()

    async def hints_until_claimed() -> AsyncIterator[str]:
        async for hint in real_hints():
            if hinting:
                yield hint

    async def held() -> str:
        stepping.set()
        await go.wait()
        return "ended"

    @workflow(name="held_step")
    async def held_step(ctx: Context) -> str:
        return await ctx.save(held)

    c.register(held_step)
    c.journal.hints = hints_until_claimed  # type: ignore[method-assign]
    async with worker(c):
        h = await c.start(held_step)
        waiting = asyncio.create_task(h.result(timeout=10))
        await stepping.wait()  # claimed, and in its step: no hint reaches us from now on
        hinting = False
        go.set()
        assert await waiting == "ended"
    await c.close()


async def test_a_result_this_process_s_worker_ended_is_not_read_back(store: Any) -> None:
    """The waiter takes the end the worker made durable as it is: no read of the run's
    row follows the wake-up. The value is the JSON form a read gives (a tuple comes
    back a list), and a failure keeps its type."""
    c = Conductor(store)
    stepping, go, looked = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def held() -> int:
        stepping.set()
        await go.wait()
        return 1

    @workflow(name="held_pair")
    async def held_pair(ctx: Context, fail: bool) -> tuple[str, int]:
        n = await ctx.save(held)
        if fail:
            raise KeyError("address")
        return ("ended", n)

    c.register(held_pair)
    real_get = c.journal.get
    reads: list[str] = []

    async def counted_get(run_id: str) -> Any:
        run = await real_get(run_id)
        reads.append(run_id)
        looked.set()
        return run

    c.journal.get = counted_get  # type: ignore[method-assign]
    async with worker(c):
        ids = []
        for fail in (False, True):
            for ev in (stepping, go, looked):
                ev.clear()
            h = await c.start(held_pair, {"fail": fail})
            ids.append(h.run_id)
            waiting = asyncio.create_task(h.result(timeout=10))
            await stepping.wait()
            await looked.wait()  # the waiter's first look: the run is in its step
            reads.clear()
            go.set()
            if fail:
                with pytest.raises(RunFailed) as failed:
                    await waiting
                assert failed.value.error_type == "KeyError"
            else:
                value: Any = await waiting  # typed as the workflow's tuple; JSON has lists
                assert value == ["ended", 1]
            assert h.run_id not in reads
    await c.close()
    async with Conductor(store) as reader:  # what a read of the row gives
        assert await reader.handle(ids[0]).result(timeout=10) == ["ended", 1]


class GatedFirstRead(NoPoll):
    """A store whose first read of a run returns what it read only once the test
    opens ``gate``: the claimed run's session is still loading meanwhile."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.read_done, self.gate = asyncio.Event(), asyncio.Event()
        self.reads: list[str] = []

    async def read(self, run_id: str, **kw: Any) -> Any:
        snap = await self._inner.read(run_id, **kw)
        self.reads.append(run_id)
        if len(self.reads) == 1:
            self.read_done.set()
            await self.gate.wait()
        return snap

    async def claim_due(self, **kw: Any) -> Any:
        # the read happens here: a claim that reads the run itself would skip ours
        return Claims(replace(c, snapshot=None) for c in await self._inner.claim_due(**kw))


@workflow(name="await_go")
async def await_go(c: Context) -> Any:
    return await c.receive("go")


async def test_an_event_sent_while_the_run_loads_after_its_read_is_taken_in(
    store: Any,
) -> None:
    """The session's first read has been made, without the event; the event's hint
    comes before the session is ready. It is kept for the session, which takes
    the event in at once (no poll here, and the run waits in place)."""
    gated = GatedFirstRead(store._inner)
    c = Conductor(gated)
    c.register(await_go)
    async with worker(c, hot_wait=30):
        h = await c.start(await_go)
        await asyncio.wait_for(gated.read_done.wait(), 10)
        await h.send("go", "after the read")
        gated.gate.set()
        assert await h.result(timeout=10) == "after the read"
    await c.close()


CLIENT = """
import asyncio, sys
from substantial import Conductor
async def main():
    async with Conductor(sys.argv[1]) as c:
        h = await c.start("hello", {"name": "process"})
        print(h.run_id)
asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["sqlite", "fs", *SERVERS])
async def test_a_client_in_another_process(kind: str, tmp_path: Path) -> None:
    """Redis and PostgreSQL signal other processes (polling is off here, so the
    hint alone must wake the worker); SQLite and files poll, their only channel."""
    url, _ = url_for(kind, tmp_path)
    async with make_backend(kind, tmp_path, url=url) as backend:
        served = Conductor(NoPoll(backend) if kind in SERVERS else backend)
        served.register(hello)
        async with worker(served):
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", CLIENT, url],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            h = served.handle(done.stdout.strip())
            assert await h.result(timeout=20) == "hello process"
        await served.close()


async def test_a_failing_hint_listener_is_logged_and_restarted(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 4 of the issue: the listener dies of an unexpected error once; it is
    logged with its traceback, restarted, and wake-ups keep arriving (no poll)."""
    c = Conductor(store)
    c.register(hello)
    real_hints = c.journal.hints
    failures = 0

    async def failing_once() -> AsyncIterator[str]:
        nonlocal failures
        if failures == 0:
            failures += 1
            yield ""
            raise RuntimeError("listener bug")
        async for hint in real_hints():
            yield hint

    c.journal.hints = failing_once  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="substantial"):
        async with worker(c):
            for i in range(3):
                h = await c.start(hello, {"name": str(i)})
                assert await h.result(timeout=10) == f"hello {i}"
    await c.close()
    errors = [r for r in caplog.records if "hint listener failed" in r.getMessage()]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and "listener bug" in str(errors[0].exc_info[1])
