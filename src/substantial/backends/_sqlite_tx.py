"""The SQLite store's transaction bodies: functions on an open connection that
run on the store's worker thread (see ``sqlite``), and the error mapping."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from .._types import RunStatus
from ..errors import BackendError, BackendUnavailable, LeaseLost, RunNotFound
from . import _rules as rules
from . import _sqlite_sql as sql
from ._protocol import Append, RunRecord

T = TypeVar("T")
Row = tuple[Any, ...]


def to_record(row: Row) -> RunRecord:
    f = dict(zip(sql.FIELDS, row, strict=True))
    f["status"] = RunStatus(f["status"])
    f["result"] = None if f["result"] is None else orjson.loads(f["result"])
    f["cancel_requested"] = bool(f["cancel_requested"])
    f["revert_requested"] = bool(f["revert_requested"])
    return RunRecord(**f)


def transact(
    conn: sqlite3.Connection, begin: str | None, fn: Callable[[sqlite3.Connection], T]
) -> T:
    """``fn`` in one transaction opened with ``begin`` (None: no transaction)."""
    if begin is None:
        return fn(conn)
    conn.execute(begin)
    try:
        out = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return out


def fence_error(c: sqlite3.Connection, run_id: str, token: int, expected: int) -> Exception:
    """Why an UPDATE with ``sql.FENCE`` matched no row."""
    row = c.execute("SELECT lease_token, log_len FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        return RunNotFound(run_id)
    if row[0] != token:
        return LeaseLost(run_id)
    return rules.log_moved(run_id, row[1], expected)


def append_in(c: sqlite3.Connection, op: Append) -> int:
    """``op`` inside the open transaction: the log's new length, or the fencing
    error (raised before anything was written, so the transaction stays clean)."""
    params: dict[str, Any] = {
        "run_id": op.run_id,
        "token": op.token,
        "expected": op.expected_len,
        "n": len(op.records),
    }
    u = op.update
    if u is not None:
        params.update(
            status=None if u.status is None else u.status.value,
            has_result=u.has_result,
            result=None
            if not u.has_result or u.result is None
            else orjson.dumps(u.result).decode(),
            error=u.error,
            error_type=u.error_type,
            ended_at=u.ended_at,
            inbox_pos=u.inbox_pos,
            release=u.release,
            due_at=u.due_at,
            now=op.now,
        )
    if c.execute(sql.APPEND if u is None else sql.APPEND_UPDATE, params).rowcount != 1:
        raise fence_error(c, op.run_id, op.token, op.expected_len)
    if op.records:
        rows = [(op.run_id, op.expected_len + i, data) for i, data in enumerate(op.records)]
        c.executemany("INSERT INTO log (run_id, pos, data) VALUES (?, ?, ?)", rows)
    return op.expected_len + len(op.records)


def is_busy(exc: BaseException) -> bool:
    """Whether SQLite refused because another connection holds the file."""
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def wrap(exc: sqlite3.Error) -> BackendError:
    msg = f"sqlite: {exc}"
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
        return BackendUnavailable(msg)
    return BackendError(msg)
