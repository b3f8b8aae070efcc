"""Threads for plain (non-async) step functions.

``save(f)`` runs a plain callable off the event loop so a blocking step (an HTTP
call with ``requests``, a slow query) cannot starve lease heartbeats or the
worker's other runs. ``asyncio.to_thread`` would do, but costs about 110 µs per
call on a small machine (a ``concurrent.futures`` future, its callback chain and a
pool of only ``min(32, cpus + 4)`` threads shared with everything else on the
loop). This pool hands each job over through one ``SimpleQueue`` and answers
through one ``call_soon_threadsafe``: about 40 µs, a real share of a step that
costs a fraction of a millisecond.

Threads are started on demand (one per job in flight, up to ``LIMIT``) and live
for the life of the process; they are daemons, so a step still running at exit
does not hold the process (its result was never recorded, so it runs again on
replay, as any unrecorded step does).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

# At most this many plain steps run at once per process; more wait their turn. The
# stdlib's default: many more threads than cores starve the event loop of the GIL
# (heartbeats arrive late and leases are lost under load).
LIMIT = min(32, (os.cpu_count() or 1) + 4)

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context,
             Callable[[], Any]]  # fmt: skip


class _StepThreads:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._outstanding = 0  # jobs queued or running

    def run(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Call ``fn()`` in a thread (with the caller's context variables)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._outstanding += 1
            spawn = self._outstanding > self._threads and self._threads < self._limit
            if spawn:
                self._threads += 1
        if spawn:
            threading.Thread(target=self._serve, name="substantial-step", daemon=True).start()
        self._jobs.put((loop, fut, contextvars.copy_context(), fn))
        return fut

    def _serve(self) -> None:
        while True:
            loop, fut, ctx, fn = self._jobs.get()
            try:
                value, error = ctx.run(fn), None
            except BaseException as exc:  # handed to the awaiting step, as to_thread does
                value, error = None, exc
            with self._lock:
                self._outstanding -= 1
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_resolve, fut, value, error)

    def _after_fork(self) -> None:
        """A forked child has none of the parent's threads: start from zero."""
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._outstanding = 0


def _resolve(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():  # the step was cancelled (timeout, lost lease): drop the result
        return
    if error is None:
        fut.set_result(value)
    elif isinstance(error, StopIteration):  # futures refuse it; keep its message
        fut.set_exception(RuntimeError(f"step raised StopIteration: {error}"))
    else:
        fut.set_exception(error)


_pool = _StepThreads(LIMIT)
os.register_at_fork(after_in_child=_pool._after_fork)


def run_in_thread(fn: Callable[[], Any]) -> asyncio.Future[Any]:
    """Run a plain step function off the loop; await the returned future."""
    return _pool.run(fn)
