"""Keeping a process's background work alive, and its logs readable.

Two small tools shared by the worker and the client:

* :func:`supervise` runs a side task (the heartbeat, the hint listener) for
  ever: if it raises anything unexpected it is logged with its traceback and
  restarted with backoff. A side task that dies silently is the worst failure
  a worker can have: it keeps claiming runs whose leases then expire under it.
* :class:`Outage` turns a stream of store failures into two log lines, one when
  the store stops answering and one when it answers again, however many loops
  and runs meet the outage in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("substantial.worker")

_FIRST_DELAY = 0.1
_MAX_DELAY = 5.0
_HEALTHY_AFTER = 30.0  # a side task that ran this long starts over at the first delay


class Backoff:
    """Exponential delays: 0.1 s doubling up to 5 s; ``reset()`` after a success."""

    def __init__(self, first: float = _FIRST_DELAY, maximum: float = _MAX_DELAY) -> None:
        self._first = first
        self._max = maximum
        self._next = first

    def reset(self) -> None:
        self._next = self._first

    async def sleep(self) -> float:
        """Sleep the current delay and double the next one; returns the delay slept."""
        delay = self._next
        self._next = min(self._next * 2, self._max)
        await asyncio.sleep(delay)
        return delay

    @property
    def next_delay(self) -> float:
        return self._next


def reraise_if_cancelling() -> None:
    """Drivers sometimes turn a cancellation into their own error (redis-py does when
    it races a read timeout); if this task was asked to stop, stop. Every loop that
    retries on errors calls this first, or a cancel could be retried for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


async def supervise(name: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body()`` until cancelled, restarting it with backoff whenever it raises
    (or returns, which a side task never should). Cancellation passes through."""
    backoff = Backoff()
    while True:
        started = time.monotonic()
        try:
            await body()
            reraise_if_cancelling()
            log.error("%s stopped unexpectedly; restarting in %.1fs", name, backoff.next_delay)
        except asyncio.CancelledError:
            raise
        except Exception:
            reraise_if_cancelling()
            log.exception("%s failed; restarting in %.1fs", name, backoff.next_delay)
        if time.monotonic() - started > _HEALTHY_AFTER:
            backoff.reset()
        await backoff.sleep()


class Outage:
    """One log line when the store goes away and one when it is back.

    Every loop that talks to the store reports here: ``failed(exc)`` on a store
    error, ``ok()`` on a success. Only the first failure of an outage is logged
    (WARNING) and the first success after it (INFO), with how long it lasted.
    """

    def __init__(self, what: str, logger: logging.Logger = log) -> None:
        self._what = what
        self._log = logger
        self._since: float | None = None

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning("%s is unreachable (%s); retrying with backoff", self._what, exc)
        else:
            self._log.debug("%s still unreachable: %s", self._what, exc)

    def ok(self) -> None:
        if self._since is not None:
            lasted = time.monotonic() - self._since
            self._since = None
            self._log.info("%s is reachable again (after %.1fs)", self._what, lasted)
