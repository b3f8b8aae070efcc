"""The thread pool that runs plain (non-async) step functions."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from typing import Any

import pytest

from substantial import _threads
from substantial._threads import run_in_thread

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_runs_off_the_event_loop_thread_and_returns_the_value() -> None:
    loop_thread = threading.get_ident()
    ran_on, value = await run_in_thread(lambda: (threading.get_ident(), 42))
    assert value == 42 and ran_on != loop_thread


async def test_the_loop_keeps_turning_while_a_step_blocks() -> None:
    """The step blocks until a coroutine on the loop lets it go: if the step held the
    loop, that coroutine could never run and the step would give up."""
    loop_thread = threading.get_ident()
    started = threading.Event()
    released = threading.Event()
    set_by: list[int] = []

    def blocking_step() -> bool:
        started.set()
        return released.wait(10)

    async def release_from_the_loop() -> None:
        await asyncio.to_thread(started.wait, 10)
        set_by.append(threading.get_ident())
        released.set()

    releaser = asyncio.create_task(release_from_the_loop())
    assert await run_in_thread(blocking_step) is True
    await releaser
    assert set_by == [loop_thread]


async def test_the_callers_context_variables_are_visible() -> None:
    request_id.set("req-7")
    assert await run_in_thread(request_id.get) == "req-7"


async def test_an_exception_reaches_the_awaiting_step() -> None:
    def boom() -> None:
        raise ValueError("card declined")

    with pytest.raises(ValueError, match="card declined"):
        await run_in_thread(boom)


async def test_stop_iteration_becomes_a_runtime_error() -> None:
    def stop() -> None:
        raise StopIteration("done")

    with pytest.raises(RuntimeError, match="StopIteration"):
        await run_in_thread(stop)


async def test_a_cancelled_wait_drops_the_late_result(monkeypatch: pytest.MonkeyPatch) -> None:
    resolved = asyncio.Event()
    errors: list[BaseException] = []
    real_resolve = _threads._resolve

    def watched(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        try:
            real_resolve(fut, value, error)
        except BaseException as exc:  # recorded: the test fails below, not the loop
            errors.append(exc)
        finally:
            resolved.set()

    monkeypatch.setattr(_threads, "_resolve", watched)
    release = threading.Event()
    fut = run_in_thread(lambda: release.wait(5))
    fut.cancel()
    release.set()
    await asyncio.wait_for(resolved.wait(), 10)  # the thread finished and tried to resolve
    assert errors == []
    assert fut.cancelled()
    assert await run_in_thread(lambda: "next") == "next"  # the pool still serves


async def test_more_jobs_than_threads_all_complete() -> None:
    n = _threads.LIMIT * 3
    start = threading.Barrier(_threads.LIMIT, timeout=5)
    peak, running, lock = 0, 0, threading.Lock()

    def job(i: int) -> int:
        nonlocal peak, running
        with lock:
            running += 1
            peak = max(peak, running)
        if i < _threads.LIMIT:
            start.wait()  # the first LIMIT jobs really run at the same time
        with lock:
            running -= 1
        return i

    results = await asyncio.gather(*(run_in_thread(functools.partial(job, i)) for i in range(n)))
    assert results == list(range(n))
    assert peak == _threads.LIMIT
