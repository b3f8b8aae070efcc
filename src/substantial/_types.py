"""Public value objects: statuses, summaries, log records, retry policy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

Seconds = timedelta | float | int


def to_seconds(d: Seconds) -> float:
    """Durations accept ``timedelta`` or float seconds everywhere."""
    if isinstance(d, timedelta):
        return d.total_seconds()
    if isinstance(d, bool) or not isinstance(d, int | float):
        raise TypeError(f"expected a timedelta or seconds, got {type(d).__name__}")
    return float(d)


class RunStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REVERTED = "REVERTED"
    CONTINUED = "CONTINUED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
        RunStatus.REVERTED,
        RunStatus.CONTINUED,
    }
)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSummary:
    run_id: str
    workflow: str
    status: RunStatus
    started_at: datetime | None
    ended_at: datetime | None
    result: Any = None
    error: str | None = None
    queue: str = "default"
    error_type: str | None = None  # the exception type of a failed run
    parent_id: str | None = None
    # what the run published (c.publish), filled in by a search that filters on it
    state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleInfo:
    """A scheduled workflow registered here (``Conductor.schedules()``): its
    schedule, its overlap policy and its next ticks (aware UTC), with the run id
    each tick's run will have."""

    workflow: str
    schedule: str
    overlap: str
    next_ticks: list[datetime]
    next_run_ids: list[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerInfo:
    """A live worker, as it registered in the store (``Conductor.workers()``).

    ``worker_id`` is the worker's lease owner string (``host:pid:hex``), the name
    its leases carry; ``last_beat`` is its latest heartbeat."""

    worker_id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    workflows: tuple[str, ...]
    started_at: datetime
    last_beat: datetime

    def serves(self, workflow: str, queue: str) -> bool:
        """Whether this worker claims runs of ``workflow`` on ``queue``."""
        return queue in self.queues and workflow in self.workflows


@dataclass(frozen=True, kw_only=True, slots=True)
class LogRecord:
    level: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    at: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class Retry:
    """Retry policy of ``save``.

    ``max_attempts`` counts executions: 3 means ``f`` is called at most 3 times.
    The delay before attempt ``n+1`` is ``min(max_backoff, backoff * factor**(n-1))``.
    Exceptions that are instances of ``non_retryable`` fail at once.
    """

    max_attempts: int = 3
    backoff: timedelta = timedelta(milliseconds=500)
    max_backoff: timedelta = timedelta(seconds=30)
    factor: float = 2.0
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("Retry.max_attempts must be at least 1")
        if self.factor < 1:
            raise ValueError("Retry.factor must be >= 1")

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = to_seconds(self.backoff) * self.factor ** (attempt - 1)
        return min(to_seconds(self.max_backoff), base)


DEFAULT_RETRY = Retry()
