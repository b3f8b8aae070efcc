"""Schedules: ``@workflow(schedule="*/5 * * * *")`` or ``@workflow(every=...)``.

No scheduler process exists. Every worker serving a scheduled workflow works
out its ticks on its own, and starts each tick's run with a run id made of the
workflow's name and the tick (``nightly@2026-12-02T03:00:00+00:00``). Starting
a run is idempotent on its id in every store (the first start wins), so
however many workers see a tick, it starts exactly one run; a worker that dies
takes nothing with it, the others start the next ticks.

On start, a worker looks ``catchup`` back: ticks missed while no worker ran are
started then (none by default). ``overlap`` says what a tick does while the
previous tick's run is still going: ``skip`` it (the default), ``buffer_one``
(start the latest such tick once the run is over), or ``allow`` (start it
anyway). Scheduled runs go to the ``default`` queue.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

if TYPE_CHECKING:
    from .workflow import Workflow

__all__ = ["OVERLAPS", "Overlap", "Schedule", "call_kwargs", "make_schedule", "tick_run_id"]

Overlap = Literal["skip", "buffer_one", "allow"]
OVERLAPS: tuple[Overlap, ...] = ("skip", "buffer_one", "allow")
SCHEDULED_QUEUE = "default"


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a workflow's ticks are: a cron expression in ``tz``, or ``every``
    seconds (ticks at whole multiples of it since the epoch, so that every
    worker finds the same ones)."""

    cron: str | None
    every: float | None
    tz: str
    overlap: Overlap
    catchup: float  # seconds looked back on start

    def next_after(self, t: float) -> float:
        """The first tick strictly after ``t`` (epoch seconds)."""
        if self.every is not None:
            return (t // self.every + 1) * self.every
        assert self.cron is not None
        start = datetime.fromtimestamp(t, ZoneInfo(self.tz))
        nxt: datetime = croniter(self.cron, start).get_next(datetime)
        return nxt.timestamp()

    def ticks(self, after: float, until: float) -> list[float]:
        """The ticks in ``(after, until]``, oldest first."""
        out: list[float] = []
        t = self.next_after(after)
        while t <= until:
            out.append(t)
            t = self.next_after(t)
        return out

    def describe(self) -> str:
        return f"every {self.every:g}s" if self.every is not None else f"{self.cron} ({self.tz})"


def make_schedule(
    schedule: str | None,
    every: timedelta | float | None,
    tz: str,
    overlap: str,
    catchup: timedelta | float,
) -> Schedule | None:
    """The schedule ``@workflow(...)`` was given, checked; None for none."""
    if schedule is None and every is None:
        return None
    if schedule is not None and every is not None:
        raise ValueError("@workflow() takes schedule= or every=, not both")
    if schedule is not None and (not isinstance(schedule, str) or not croniter.is_valid(schedule)):
        raise ValueError(
            f"@workflow(schedule=) is not a cron expression: {schedule!r} "
            '(five fields, or six with seconds last: "* * * * * */5" is every 5 s)'
        )
    seconds = None if every is None else _seconds(every)
    if seconds is not None and not seconds > 0:
        raise ValueError(f"@workflow(every=) must be a positive duration, got {every!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"@workflow(tz=) is not a time zone: {tz!r}") from None
    if overlap not in OVERLAPS:
        raise ValueError(
            f"@workflow(overlap=) must be one of {', '.join(OVERLAPS)}, got {overlap!r}"
        )
    back = _seconds(catchup)
    if back < 0:
        raise ValueError(f"@workflow(catchup=) must be zero or more, got {catchup!r}")
    return Schedule(cron=schedule, every=seconds, tz=tz, overlap=overlap, catchup=back)


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def tick_run_id(workflow: str, tick: float) -> str:
    """The run id of ``workflow``'s run for ``tick``: the same in every worker."""
    return f"{workflow}@{datetime.fromtimestamp(tick, UTC).isoformat()}"


def tick_prefix(workflow: str) -> str:
    return f"{workflow}@"


def tick_kwargs(wf: Workflow[Any], tick: float) -> dict[str, Any]:
    """The kwargs of a tick's run: ``scheduled_at`` if the function accepts it."""
    params = inspect.signature(wf.fn).parameters
    takes = "scheduled_at" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    return {"scheduled_at": datetime.fromtimestamp(tick, UTC).isoformat()} if takes else {}


def call_kwargs(wf: Workflow[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs to call a run's function with: a scheduled run's ``scheduled_at``
    as the aware datetime it is (the store keeps its ISO form)."""
    out = dict(kwargs)
    at = out.get("scheduled_at")
    if wf.schedule is not None and isinstance(at, str):
        out["scheduled_at"] = datetime.fromisoformat(at)
    return out
