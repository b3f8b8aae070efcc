"""The ``@workflow()`` decorator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._schedules import Schedule, make_schedule

if TYPE_CHECKING:
    from ._context import Context

R = TypeVar("R")
WorkflowFn = Callable[..., Awaitable[R]]


@dataclass(frozen=True, slots=True)
class Workflow(Generic[R]):
    """A registered-able workflow: an async function whose first argument is a Context.

    The name identifies the workflow in the store: keep it stable across
    deployments (runs in flight find their code by it). ``events``: the events a
    run accepts, name -> payload type (None: any name, any JSON payload).
    """

    name: str
    fn: Callable[..., Awaitable[R]]
    events: Mapping[str, Any] | None = None
    timeout: float | None = None  # seconds from a run's start to its deadline
    schedule: Schedule | None = None  # when the workers start a run on their own

    async def __call__(self, c: Context, **kwargs: Any) -> R:
        return await self.fn(c, **kwargs)


@overload
def workflow(fn: WorkflowFn[R], /) -> Workflow[R]: ...
@overload
def workflow(
    *,
    name: str | None = None,
    events: Mapping[str, Any] | None = None,
    timeout: timedelta | float | None = None,
    schedule: str | None = None,
    every: timedelta | float | None = None,
    tz: str = "UTC",
    overlap: str = "skip",
    catchup: timedelta | float = 0,
) -> Callable[[WorkflowFn[R]], Workflow[R]]: ...
@overload
def workflow(name: str | None = None, /) -> Callable[[WorkflowFn[R]], Workflow[R]]: ...


def workflow(
    fn: Any = None,
    /,
    *,
    name: str | None = None,
    events: Mapping[str, Any] | None = None,
    timeout: timedelta | float | None = None,
    schedule: str | None = None,
    every: timedelta | float | None = None,
    tz: str = "UTC",
    overlap: str = "skip",
    catchup: timedelta | float = 0,
) -> Any:
    """Mark an async function as a workflow: ``@workflow()`` or ``@workflow(name="x")``.

    ``events={"approved": bool, "item": Item}`` declares the events its runs take:
    ``send`` refuses any other name, or a payload that does not fit its type,
    before anything is stored, and ``receive`` returns the typed value.
    ``timeout``: each run's deadline, counted from its start (``start(timeout=)``
    overrides it): a run still going then ends CANCELLED, its descendants too.
    ``schedule`` (cron, seconds as an optional sixth field) in ``tz``, or
    ``every``: the workers start one run per tick (see ``_schedules``)."""
    if isinstance(fn, str):
        name, fn = fn, None
    declared = None
    if events is not None:
        if not isinstance(events, Mapping) or not all(isinstance(k, str) and k for k in events):
            raise TypeError("@workflow(events=) takes a mapping of event names to payload types")
        declared = dict(events)
    limit = None if timeout is None else deadline_seconds(timeout, "@workflow(timeout=)")
    ticks = make_schedule(schedule, every, tz, overlap, catchup)

    def wrap(f: WorkflowFn[R]) -> Workflow[R]:
        if not callable(f):
            raise TypeError("@workflow() decorates an async function")
        return Workflow(
            name=name or f.__name__, fn=f, events=declared, timeout=limit, schedule=ticks
        )

    return wrap(fn) if fn is not None else wrap


def deadline_seconds(timeout: timedelta | float, what: str) -> float:
    """``timeout`` in seconds, refused unless it is positive."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if not seconds > 0:
        raise ValueError(f"{what} must be a positive duration, got {timeout!r}")
    return seconds


def workflow_name(wf: Workflow[Any] | str) -> str:
    return wf if isinstance(wf, str) else wf.name
