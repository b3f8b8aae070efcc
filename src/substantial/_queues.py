"""Queues with limits: what ``Conductor.queue`` declares and every claim obeys.

A queue's limits are declared in code, like its workflows, so every process
that serves it claims under the same ones; the store enforces them at claim
time (``claim_due(limits=...)``), counting every run of the queue whoever holds
it, so they hold across processes and machines. Nothing about a queue is kept
in the store but its runs: a worker that declares other limits claims under
those (declare them once, in the module the workers and clients import).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ._types import to_seconds
from .backends import QueueLimits
from .errors import ClientError, ConfigurationError

__all__ = ["PRIORITY_MAX", "PRIORITY_MIN", "Queue", "QueueRegistry"]

PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1  # a start's priority: a 32-bit integer


@dataclass(frozen=True, kw_only=True, slots=True)
class Queue:
    """A declared queue (what ``Conductor.queue`` returns).

    ``concurrency``: at most this many of its runs hold a lease (are being
    driven by some worker) at once, per ``concurrency_key`` (runs started
    without one share one group). ``rate``: at most ``rate[0]`` of its runs start
    (are first claimed) within any ``rate[1]``. ``priority``: runs are taken by
    their ``start(priority=)``, lowest number first, then by due time."""

    name: str
    concurrency: int | None = None
    rate: tuple[int, timedelta] | None = None
    priority: bool = False

    @property
    def limits(self) -> QueueLimits | None:
        """The store's form of these limits (None: a queue with none)."""
        if self.concurrency is None and self.rate is None and not self.priority:
            return None
        return QueueLimits(
            concurrency=self.concurrency,
            rate=None if self.rate is None else self.rate[0],
            period=1.0 if self.rate is None else self.rate[1].total_seconds(),
            priority=self.priority,
        )


def _rate(rate: object) -> tuple[int, timedelta] | None:
    if rate is None:
        return None
    if not isinstance(rate, tuple) or len(rate) != 2:
        raise ConfigurationError(
            f"queue rate must be (limit, period), e.g. (10, timedelta(seconds=1)); got {rate!r}"
        )
    limit, period = rate
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"queue rate limit must be a whole number >= 1, got {limit!r}")
    try:
        seconds = to_seconds(period)
    except TypeError:
        raise ConfigurationError(
            f"queue rate period must be a timedelta or seconds, got {period!r}"
        ) from None
    if not seconds > 0:
        raise ConfigurationError(f"queue rate period must be positive, got {period!r}")
    return limit, timedelta(seconds=seconds)


def declared(name: str, *, concurrency: int | None, rate: object, priority: bool) -> Queue:
    """A :class:`Queue` from ``Conductor.queue``'s arguments, each checked."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError("a queue name must be a non-empty string")
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ConfigurationError(
            f"queue concurrency must be a whole number >= 1 (or None), got {concurrency!r}"
        )
    if not isinstance(priority, bool):
        raise ConfigurationError(f"queue priority must be True or False, got {priority!r}")
    return Queue(name=name, concurrency=concurrency, rate=_rate(rate), priority=priority)


class QueueRegistry:
    """The queues one Conductor declared: its workers read their limits at each
    claim, its ``start`` checks a run's options against them."""

    def __init__(self) -> None:
        self._queues: dict[str, Queue] = {}

    def declare(self, queue: Queue) -> Queue:
        """Add ``queue``; declaring the same queue again is a no-op, other limits
        for a declared name are a ConfigurationError (which would win is unclear)."""
        known = self._queues.get(queue.name)
        if known is not None and known != queue:
            raise ConfigurationError(
                f"queue {queue.name!r} is declared already with other limits ({known})"
            )
        self._queues[queue.name] = queue
        return queue

    def get(self, name: str) -> Queue | None:
        return self._queues.get(name)

    def limits(self, name: str) -> QueueLimits | None:
        """What a claim of queue ``name`` obeys (None: no limits declared)."""
        queue = self._queues.get(name)
        return None if queue is None else queue.limits

    def all(self) -> list[Queue]:
        return sorted(self._queues.values(), key=lambda q: q.name)

    def start_options(
        self, queue: str, priority: int | None, concurrency_key: str | None
    ) -> dict[str, Any]:
        """``start``'s queue options, checked, as ``Journal.create`` takes them;
        against the queue's limits if it is declared here (an option the queue
        would ignore is a mistake: a ClientError, not a silent no-op)."""
        if priority is not None and (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or not PRIORITY_MIN <= priority <= PRIORITY_MAX
        ):
            raise ClientError(
                f"start(priority=) must be a whole number from {PRIORITY_MIN} to "
                f"{PRIORITY_MAX} (a 32-bit integer, as every store keeps it), got {priority!r}"
            )
        if concurrency_key is not None and (
            not isinstance(concurrency_key, str) or not concurrency_key
        ):
            raise ClientError("start(concurrency_key=) must be a non-empty string")
        known = self._queues.get(queue)
        if known is not None and priority is not None and not known.priority:
            raise ClientError(
                f"start(priority=) on queue {queue!r}, which does not order by priority: "
                f"declare it with conductor.queue({queue!r}, priority=True)"
            )
        if known is not None and concurrency_key is not None and known.concurrency is None:
            raise ClientError(
                f"start(concurrency_key=) on queue {queue!r}, which has no concurrency "
                f"limit: declare it with conductor.queue({queue!r}, concurrency=N)"
            )
        return {"priority": priority or 0, "concurrency_key": concurrency_key}
