"""Drive one claimed run from its log to its next stop (end, suspension, cancel).

This is where every outcome of a workflow coroutine is turned into exactly one
store update, and where bad data stays contained: a corrupt log, a value that
is not JSON or a non-deterministic replay fails *that run* with a clear
message; the worker carries on with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import traceback
from datetime import UTC, datetime
from typing import Any

from ._context import Context, child_event
from ._interrupts import CancelRun, DeadlineExpired, StopRun, Suspend
from ._journal import RunSession
from ._schedules import call_kwargs
from ._types import RunStatus
from .codec import to_json
from .errors import BackendError, RunFinished, RunNotFound
from .workflow import Workflow

log = logging.getLogger(__name__)
_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def error_message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without the frames inside this package: what the
    workflow's author needs (their files and lines), chained causes included."""
    te = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    todo = [te]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        frames = [f for f in t.stack if not os.path.abspath(f.filename).startswith(_PKG_DIR)]
        t.stack = traceback.StackSummary.from_list(frames)
        todo.extend(x for x in (t.__cause__, t.__context__) if x is not None)
    return "".join(te.format())


async def drive(session: RunSession, wf: Workflow[Any], *, hot_wait: float) -> float | None:
    """Run ``wf`` over ``session`` until it ends or suspends; returns the wake-up
    time of a suspended run. Never raises for workflow errors; raises only
    CancelledError (shutdown) and BackendError (lease lost, store down)."""
    run = session.run
    if session.corrupt is not None:
        await _end(
            session, RunStatus.FAILED, error=str(session.corrupt), error_type="CorruptRecord"
        )
        return None
    deadline = session.start.get("deadline")
    if run.cancel_requested and not run.revert_requested:
        await _cancel(session, reason=_overdue(session, deadline))
        return None  # (a revert replays first: the compensations are in the code)
    if deadline is not None and session.journal.clock() >= deadline:
        await _cancel(session, reason=_expired(deadline))  # no replay: nothing runs now
        return None
    ctx = Context(session, hot_wait=hot_wait, events=wf.events)
    try:
        status, value = await _workflow(session, wf, ctx)
    except Suspend as s:
        _raise_if_lost(session)
        due = s.due if deadline is None else min(deadline, s.due or deadline)
        await session.suspend(due, ctx.flush_records())
        return due
    except DeadlineExpired as d:
        _raise_if_lost(session)
        await _cancel(session, ctx.flush_records(), reason=_expired(d.deadline))
        return None
    except StopRun as stop:
        _raise_if_lost(session)
        await _stopped(session, stop, ctx.flush_records())
        return None
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        _raise_if_lost(session)
        if isinstance(exc, BackendError):
            raise
        await _failed(session, wf, exc, ctx.flush_records())
        return None
    _raise_if_lost(session)
    if status == RunStatus.COMPLETED:
        await _end(session, status, result=value, extra=ctx.flush_records())
    else:
        reason = _overdue(session, deadline) if status == RunStatus.CANCELLED else None
        await _cancel(session, ctx.flush_records(), status=status, reason=reason)
    return None


async def _workflow(session: RunSession, wf: Workflow[Any], ctx: Context) -> tuple[RunStatus, Any]:
    """Run the workflow's code: COMPLETED with its JSON value, or CANCELLED when a
    cancel stopped it. ``cancel(revert=True)`` runs the compensations first, newest
    first, and ends REVERTED; a compensation waiting out a retry suspends the run
    (the next claim replays to here and goes on), one that fails for good fails
    it, as in ``revert()``: ``drive`` handles those as it does the workflow's own."""
    try:
        await session.pull_if_needed()
        result = await wf.fn(ctx, **call_kwargs(wf, ctx.kwargs))
    except CancelRun:
        _raise_if_lost(session)
        if not session.run.revert_requested:
            return RunStatus.CANCELLED, None
        await ctx.cancel_revert()
        return RunStatus.REVERTED, None
    ctx.check_complete()
    value = to_json(
        result, what=f"the return value of workflow {wf.name!r}", limit=session.journal.max_payload
    )
    return RunStatus.COMPLETED, value


async def _stopped(session: RunSession, stop: StopRun, pending: list[Any]) -> None:
    """A primitive ended the run (revert, continue_using)."""
    await _end(session, RunStatus(stop.status), result=stop.result, extra=pending)
    if stop.status == RunStatus.CONTINUED and isinstance(stop.result, dict):
        # Events the run never saw, then those still in its inbox (none can land
        # now that it is terminal: send follows the chain instead): the successor's.
        await session.journal.forward_events(
            session.run_id, str(stop.result["continued_to"]), stop.unobserved
        )


async def _failed(
    session: RunSession, wf: Workflow[Any], exc: Exception, pending: list[Any]
) -> None:
    """The workflow raised: the run ends FAILED with what its author needs to see."""
    tb = user_traceback(exc)
    log.warning(
        "run %s (%s) failed: %s: %s\n%s",
        session.run_id,
        wf.name,
        type(exc).__name__,
        exc,
        tb.rstrip(),
        extra={"run_id": session.run_id, "error_type": type(exc).__name__},
    )
    await _end(
        session,
        RunStatus.FAILED,
        error=error_message(exc),
        error_type=type(exc).__name__,
        traceback=tb,
        extra=pending,
    )


def _raise_if_lost(session: RunSession) -> None:
    if session.lost is not None:
        raise session.lost


async def _end(
    session: RunSession,
    status: RunStatus,
    *,
    result: Any = None,
    error: str | None = None,
    error_type: str | None = None,
    traceback: str | None = None,
    extra: list[Any] | None = None,
) -> None:
    await session.finish(
        status,
        result=result,
        error=error,
        error_type=error_type,
        traceback=traceback,
        extra=extra or (),
    )
    parent = session.run.parent_id
    if parent is not None and status != RunStatus.CONTINUED:
        outcome = {"status": status.value, "v": result, "err": error}
        # the parent may be gone or already over: then nobody is waiting
        with contextlib.suppress(RunNotFound, RunFinished):
            origin = session.start.get("origin", session.run_id)
            await session.journal.deliver(parent, child_event(origin), outcome)


def _overdue(session: RunSession, deadline: float | None) -> str | None:
    """The reason for a cancel that came once the run's deadline had passed (its
    parent's, expiring, cancelled it): the deadline, not a client's cancel."""
    if deadline is None or session.journal.clock() < deadline:
        return None
    return _expired(deadline)


def _expired(deadline: float) -> str:
    when = datetime.fromtimestamp(deadline, UTC).isoformat(timespec="seconds")
    return f"its deadline passed ({when})"


async def _cancel(
    session: RunSession,
    extra: list[Any] | None = None,
    status: RunStatus = RunStatus.CANCELLED,
    *,
    reason: str | None = None,
) -> None:
    """End the run CANCELLED (or REVERTED) and cancel its descendants. ``reason``:
    why, when it was not a client's cancel (a deadline)."""
    children = [r["v"] for r in session.records if r.get("p") == "start_child" and "v" in r]
    error_type = None if reason is None else "DeadlineExceeded"
    await _end(session, status, extra=extra, error=reason, error_type=error_type)
    for child in children:
        with contextlib.suppress(RunNotFound):
            await session.journal.cancel(child)
