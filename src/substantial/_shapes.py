"""The JSON documents operators see: one shape for the CLI's ``--json`` and the
HTTP API (DESIGN.md section 6, "Shapes"), written once."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._history import History, HistoryEntry
from ._types import LogRecord, RunStatus, RunSummary, WorkerInfo

if TYPE_CHECKING:
    from .conductor import Conductor

__all__ = [
    "entry_doc",
    "history_doc",
    "iso",
    "log_doc",
    "summary_doc",
    "unserved",
    "worker_doc",
]


def iso(t: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return None if t is None else t.astimezone(UTC).isoformat()


def summary_doc(s: RunSummary, *, unserved: bool | None = None) -> dict[str, Any]:
    """A run summary: ``run_id, workflow, status, queue, parent_id, started_at,
    ended_at, result, error, error_type``; with ``unserved`` given, that field too
    (see :func:`unserved`)."""
    doc: dict[str, Any] = {
        "run_id": s.run_id,
        "workflow": s.workflow,
        "status": str(s.status),
        "queue": s.queue,
        "parent_id": s.parent_id,
        "started_at": iso(s.started_at),
        "ended_at": iso(s.ended_at),
        "result": s.result,
        "error": s.error,
        "error_type": s.error_type,
    }
    if unserved is not None:
        doc["unserved"] = unserved
    return doc


async def unserved(conductor: Conductor, runs: Sequence[RunSummary]) -> list[bool]:
    """For each run, whether it is PENDING with no live worker serving its workflow
    on its queue: it waits for a worker that is not there (a mistyped workflow
    name, a queue nobody serves, every worker down). One ``workers()`` lookup for
    the lot, and none when no run is PENDING. Only PENDING runs are flagged: a
    SUSPENDED one waits for its timer or event before it needs a worker."""
    if not any(s.status == RunStatus.PENDING for s in runs):
        return [False] * len(runs)
    workers = await conductor.workers()
    return [
        s.status == RunStatus.PENDING and not await conductor.served_by(s, workers=workers)
        for s in runs
    ]


def log_doc(line: LogRecord) -> dict[str, Any]:
    """A run's log line: ``level, message, fields, at``."""
    return {"level": line.level, "message": line.message, "fields": line.fields, "at": iso(line.at)}


def entry_doc(e: HistoryEntry) -> dict[str, Any]:
    """A timeline entry: ``seq, kind, name, at, started_at, duration_ms, attempts,
    error, value`` (see ``_history`` for what each kind puts there)."""
    return {
        "seq": e.seq,
        "kind": e.kind,
        "name": e.name,
        "at": e.at,
        "started_at": iso(e.started_at),
        "duration_ms": e.duration_ms,
        "attempts": e.attempts,
        "error": e.error,
        "value": e.value,
    }


def history_doc(h: History) -> dict[str, Any]:
    """One page of a run's timeline: ``run_id, entries, next_cursor``."""
    return {
        "run_id": h.run_id,
        "entries": [entry_doc(e) for e in h.entries],
        "next_cursor": h.next_cursor,
    }


def worker_doc(w: WorkerInfo) -> dict[str, Any]:
    """A live worker: ``worker_id, host, pid, queues, workflows, started_at, last_beat``."""
    return {
        "worker_id": w.worker_id,
        "host": w.host,
        "pid": w.pid,
        "queues": list(w.queues),
        "workflows": list(w.workflows),
        "started_at": iso(w.started_at),
        "last_beat": iso(w.last_beat),
    }
