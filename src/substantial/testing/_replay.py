"""Replay a recorded history against today's code, with no effects.

The history is loaded into a private memory store and the workflow runs over it
as a worker would after a restart: every call the log answers returns its
recorded outcome, and the first call it cannot answer is where the replay
stops, before any effect (a save there is stopped before its function runs; a
wait there simply waits). Writes of that private copy touch nothing real.

So a replay says one thing: whether the code makes the calls the log recorded,
in the same order, and ends the way the log did. The first difference raises
:class:`~substantial.NonDeterminismError`, naming the call the code makes now
and the one the log recorded, with their code lines.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from .. import _records as R
from .._context import Context
from .._export import HistoryFile, RunHistory, load_histories
from .._interrupts import CancelRun, DeadlineExpired, StopRun, Suspend
from .._journal import Journal
from .._replay import describe_record
from .._schedules import call_kwargs
from ..backends import NewRun
from ..backends.memory import MemoryBackend
from ..codec import to_json
from ..errors import ClientError, NonDeterminismError
from ..workflow import Workflow
from ._either import AwaitableResult, run_to_end

__all__ = ["Replayed", "replay", "replay_run"]

Outcome = Literal["ended", "waiting", "live"]
_LEASE = 3600.0


class _LiveEdge(BaseException):
    """A save past the log's end would run its effect: the replay stops there
    (a BaseException, so the save's own error handling does not record it)."""


def _stop() -> Any:
    raise _LiveEdge


@dataclass(frozen=True, slots=True)
class Replayed(AwaitableResult):
    """How a replay ended: ``calls`` durable calls were answered by the log, then
    the code ``ended`` (returned or raised as the log says), was ``waiting``
    (a wait the log has not seen end), or went ``live`` (a new call)."""

    run_id: str
    calls: int
    outcome: Outcome


def replay(
    history: HistoryFile | RunHistory | dict[str, Any] | str | Path,
    workflow: Workflow[Any],
) -> Replayed:
    """Replay one exported run (a file path, a loaded document, or a run of one)
    against ``workflow``; raises NonDeterminismError at the first divergence.
    Call it plainly or ``await`` it (see ``_either``)."""
    runs = load_histories(history)
    if len(runs) != 1:
        ids = ", ".join(r.run_id for r in runs) or "none"
        raise ClientError(f"replay() takes the history of one run; this one has {ids}")
    return run_to_end(lambda: replay_run(runs[0], workflow))


async def replay_run(run: RunHistory, workflow: Workflow[Any]) -> Replayed:
    """Replay ``run`` against ``workflow`` (see the module docstring)."""
    if run.workflow != workflow.name:
        raise ClientError(
            f"run {run.run_id!r} is of workflow {run.workflow!r}, not {workflow.name!r}"
        )
    if not run.records or run.records[0].get("k") != R.START:
        raise ClientError(f"run {run.run_id!r}: the history does not begin with a start record")
    backend = MemoryBackend()
    journal = Journal(backend)
    await journal.open()
    try:
        encoded = [orjson.dumps(r) for r in run.records]
        now = time.time()
        await backend.create_run(
            NewRun(
                run_id=run.run_id,
                workflow=workflow.name,
                queue=run.queue,
                first_record=encoded[0],
                more_records=tuple(encoded[1:]),
                created_at=run.created_at,
                due_at=now,
            )
        )
        claims = await backend.claim_due(
            queue=run.queue,
            workflows=[workflow.name],
            limit=1,
            owner="replay",
            lease_seconds=_LEASE,
            now=now,
        )
        session = await journal.open_session(claims[0], _LEASE)
        assert session is not None
        if session.corrupt is not None:
            raise ClientError(f"run {run.run_id!r}: {session.corrupt}")
        journal.stub("*", _stop)
        ctx = Context(session, hot_wait=0, events=workflow.events)
        return await _drive(ctx, workflow, run.run_id, run.records)
    finally:
        await journal.close()


async def _drive(
    ctx: Context, workflow: Workflow[Any], run_id: str, records: Sequence[R.Record]
) -> Replayed:
    end = next((r for r in records if r.get("k") == R.END), None)
    try:
        result = await workflow.fn(ctx, **call_kwargs(workflow, ctx.kwargs))
    except NonDeterminismError:
        raise
    except (_LiveEdge, StopRun, CancelRun, DeadlineExpired):
        return Replayed(run_id, ctx.calls_made, "live")
    except Suspend:
        return Replayed(run_id, ctx.calls_made, "waiting")
    except Exception as exc:
        _check_failure(ctx, run_id, exc, end)
        return Replayed(run_id, ctx.calls_made, "ended")
    ctx.check_complete()
    if end is not None:
        value = to_json(result, what=f"the return value of workflow {workflow.name!r}")
        if end.get("status") != "COMPLETED" or end.get("v") != value:
            raise NonDeterminismError(
                run_id=run_id,
                step=ctx.calls_made,
                expected=f"return {_short(value)} (the workflow completes)",
                recorded=_ending(end),
            )
    return Replayed(run_id, ctx.calls_made, "ended")


def _check_failure(ctx: Context, run_id: str, exc: Exception, end: R.Record | None) -> None:
    """The code raised: consistent if the log ended FAILED with that error, or the
    log has nothing more (the run would fail now); else a divergence."""
    name = type(exc).__name__
    if end is not None:
        err = end.get("err") or {}
        if end.get("status") == "FAILED" and err.get("type") == name:
            return
        recorded = _ending(end)
    else:
        pending = ctx.next_recorded()
        if pending is None:
            return
        recorded = describe_record(pending)
    raise NonDeterminismError(
        run_id=run_id,
        step=ctx.calls_made,
        expected=f"raise {name}: {exc} (the workflow fails)",
        recorded=recorded,
    )


def _ending(end: R.Record) -> str:
    status = end.get("status")
    if status == "FAILED":
        err = end.get("err") or {}
        return f"the run failing with {err.get('type')}: {err.get('msg')}"
    if status == "COMPLETED":
        return f"the run completing with {_short(end.get('v'))}"
    return f"the run ending {status}"


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 80 else text[:77] + "..."
