"""The SQLite store's transaction bodies: functions on an open connection that
run on the store's worker thread (see ``sqlite``), and the error mapping."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from .._types import RunStatus
from ..errors import BackendError, BackendUnavailable, LeaseLost, RunNotFound
from . import _rules as rules
from . import _sqlite_sql as sql
from ._protocol import Append, Claim, Claims, QueueLimits, RunRecord

T = TypeVar("T")
Row = tuple[Any, ...]


def to_record(row: Row) -> RunRecord:
    f = dict(zip(sql.FIELDS, row, strict=True))
    f["status"] = RunStatus(f["status"])
    f["result"] = None if f["result"] is None else orjson.loads(f["result"])
    f["cancel_requested"] = bool(f["cancel_requested"])
    f["revert_requested"] = bool(f["revert_requested"])
    if f["state"] is not None:
        f["state"] = orjson.loads(f["state"])
    return RunRecord(**f)


def merged_state(old: str | None, new: str) -> str | None:
    """``sql.MERGE_STATE``, called by SQLite inside an append's UPDATE: the run's
    state (JSON text) with the values just published (JSON text) merged in key by
    key, as ``_rules.merged_state`` does, within the append's write transaction.
    In Python because orjson round-trips every value exactly (an int stays an int,
    a float a float, a null a null) and the keys need no JSON path. NULL (a run
    the store holds no index of) stays NULL."""
    if old is None:
        return None
    return orjson.dumps({**orjson.loads(old), **orjson.loads(new)}).decode()


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
    if u is None:
        stmt = sql.APPEND
    elif u.state:  # publishes: the one variant that touches the state column
        stmt = sql.APPEND_UPDATE_STATE
        params["state"] = orjson.dumps(u.state).decode()
    else:
        stmt = sql.APPEND_UPDATE
    if c.execute(stmt, params).rowcount != 1:
        raise fence_error(c, op.run_id, op.token, op.expected_len)
    if op.records:
        rows = [(op.run_id, op.expected_len + i, data) for i, data in enumerate(op.records)]
        c.executemany("INSERT INTO log (run_id, pos, data) VALUES (?, ?, ?)", rows)
    return op.expected_len + len(op.records)


def claim_limited(
    c: sqlite3.Connection,
    *,
    queue: str,
    workflows: Sequence[str],
    limit: int,
    owner: str,
    lease_seconds: float,
    now: float,
    limits: QueueLimits,
) -> Claims:
    """A claim under ``limits``, inside the claim's BEGIN IMMEDIATE transaction: the
    write lock is held from the first read, so what the limits count (live leases,
    starts in the window) cannot change before the claim's UPDATEs commit, in this
    process or any other; the shared ``LimitGate`` decides.

    Candidates come in claim order a few at a time, and the SELECT leaves out what
    the gate would refuse anyway: slot groups already full, and never-started runs
    once the rate held one back (the first such refusal sets ``held_until``, later
    ones cannot change it). Each candidate fetched is then either taken or the
    reason to select again with one more exclusion, so Python sees about ``limit``
    rows however long the queue's backlog, and the gate's answer is exactly what it
    would give seeing every candidate."""
    cap = limits.concurrency
    if cap is not None and cap <= 0:
        return Claims()  # no slot at all: the gate would refuse every candidate
    busy: dict[str | None, int] = {}
    if limits.concurrency is not None:
        busy = {key: n for key, n in c.execute(sql.BUSY, (queue, now))}
    starts: list[float] = []
    if limits.rate is not None:
        starts = [row[0] for row in c.execute(sql.STARTS, (queue, now - limits.period))]
    gate = rules.LimitGate(limits, busy=busy, starts=starts, now=now)
    full = set() if cap is None else {key for key, n in busy.items() if n >= cap}
    taken: list[tuple[str, int]] = []
    after: Row = ()
    started_only = False
    while len(taken) < limit:
        keys = sorted(k for k in full if k is not None)
        stmt = sql.limited_select(
            len(workflows),
            priority=limits.priority,
            full=len(keys),
            full_unkeyed=None in full,
            started_only=started_only,
            resume=bool(after),
        )
        batch = limit - len(taken) + 1
        rows = c.execute(stmt, (queue, now, *workflows, now, *keys, *after, batch)).fetchall()
        again = False
        for run_id, token, key, started_at, *order in rows:
            after = tuple(order)
            if not gate.admit(key, started=started_at is not None):
                if gate.held_until is not None and not started_only:
                    started_only = again = True  # the rate is spent: started runs only
                    break
                continue
            taken.append((run_id, token))
            if len(taken) >= limit:
                break
            if cap is not None:
                busy[key] = busy.get(key, 0) + 1
                if busy[key] >= cap:
                    full.add(key)  # this group is spent: select without it
                    again = True
                    break
        if not again and len(rows) < batch:
            break  # no candidate left
    if taken:
        c.executemany(
            sql.CLAIM,
            [(now, owner, now + lease_seconds, run_id) for run_id, _ in taken],
        )
    return Claims((Claim(run_id=r, token=t + 1) for r, t in taken), held_until=gate.held_until)


def is_busy(exc: BaseException) -> bool:
    """Whether SQLite refused because another connection holds the file."""
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def wrap(exc: sqlite3.Error) -> BackendError:
    msg = f"sqlite: {exc}"
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
        return BackendUnavailable(msg)
    return BackendError(msg)
