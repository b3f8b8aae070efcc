"""The SQLite store: the embedded default, shared safely by processes on one machine.

Layout (one file, schema version in ``meta``)::

    meta  (key PRIMARY KEY, value)                 schema_version = SCHEMA_VERSION
    runs  (run_id PRIMARY KEY, RunRecord fields..., last_inbox_id)
          index runs_claim (queue, due_at)         -- claim_due's range scan
          index runs_created (created_at, run_id)  -- list_runs' order
          index runs_wf_created (workflow, created_at, run_id), runs_wf_status (workflow, status)
          index runs_started (queue, started_at) WHERE started_at IS NOT NULL  -- rate windows
          index runs_leased (queue, concurrency_key) WHERE lease_owner IS NOT NULL  -- slots
          index runs_keyed (queue, concurrency_key, due_at) WHERE concurrency_key IS NOT NULL
    log   (run_id, pos, data BLOB)  PRIMARY KEY (run_id, pos), WITHOUT ROWID
    inbox (run_id, id, data BLOB)   PRIMARY KEY (run_id, id),  WITHOUT ROWID
    workers (worker_id PRIMARY KEY, info JSON, lease, last_beat)   -- the worker registry

``result`` is JSON text (orjson) or NULL; ``status`` is the RunStatus value.
``state`` is the run's published state, JSON text (orjson), NULL for the runs
made before schema 7 (the store holds no index of those: their logs do); an
append that publishes merges into it in its UPDATE (``_sqlite_sql.APPEND_UPDATE_STATE``),
and ``list_runs`` pushes ``state_equals`` down to ``json_each(state)``.
Inbox items are kept after consumption (like the memory store); ``read`` only
returns those with ``id > inbox_pos``. ``last_inbox_id`` numbers deliveries.

Why it is built this way:

* **WAL** lets readers run while one process writes, and with
  ``synchronous=NORMAL`` a commit costs no fsync (durable at the next
  checkpoint; a power cut can lose the last commits, never corrupt the file).
* **BEGIN IMMEDIATE** on every write takes the write lock up front, so the
  read-check-write inside a transaction (a claim, an append's fencing check)
  is exclusive across processes, and lock waits go through ``busy_timeout``
  instead of failing with SQLITE_BUSY when a deferred reader upgrades.
* **One connection, one thread** (``_sqlite_conn``): reads, and any write that
  must wait for a lock another process holds, run on the store's thread, one
  function per operation, one transaction each. A write that needs no waiting
  (the connection is free, the file's lock too) runs inline on the event loop
  instead: no thread hop; the busy timeout is 0 outside the thread, so inline
  never blocks on a lock. Appends that had to wait go together as one
  transaction (group commit, ``append_batch``). An append without an update
  is BEGIN, one fenced UPDATE (``WHERE lease_token = ? AND log_len = ?``),
  one INSERT, COMMIT; the
  release rule is evaluated inside that UPDATE (no RETURNING: old SQLite works).
  ``rewrite_log`` (compaction) is the same fenced UPDATE, then a DELETE of the
  run's log rows and the INSERT of the new ones, in one transaction.
* **Queue limits** need no lock of their own: a claim already holds the write lock
  (BEGIN IMMEDIATE) from its first read, so a limited claim counts the queue's
  live leases per key and its starts in the rate window, feeds the candidates
  through ``_rules.LimitGate`` and writes its claims in that one transaction: no
  other claimer, in any process, can change what it counted before it commits
  (``_sqlite_tx.claim_limited``). An unlimited claim is one SELECT and the UPDATEs.

Changes made in this process are hinted through the process-wide hub of this file
(every backend object on the same resolved path shares it, so a second Conductor in
this process is never left to the poll); changes made by other processes are only
seen by polling every ``poll_interval``.

Opening (``_sqlite_conn``, with the connection and its thread) is safe while other
processes open the same fresh file: the busy timeout is set first, the WAL switch is
skipped when already done, the schema is created or upgraded in one BEGIN IMMEDIATE
transaction that a second opener waits for and then finds done, and the collisions
SQLite reports as busy without waiting (a WAL switch or recovery in another
connection) make setup retry until the busy timeout.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any

import orjson

from .._types import RunStatus
from ..errors import BackendError, RunFinished, RunNotFound
from . import _rules as rules
from . import _sqlite_sql as sql
from ._hub import shared_hub
from ._protocol import (
    ALL_RUNS,
    Append,
    Claim,
    InboxItem,
    NewRun,
    QueueLimits,
    RunCounts,
    RunQuery,
    RunRecord,
    RunUpdate,
    Snapshot,
)
from ._registry import SQLiteRegistry
from ._sqlite_conn import SCHEMA_VERSION as SCHEMA_VERSION  # re-exported
from ._sqlite_conn import SQLiteConnection
from ._sqlite_tx import append_in, claim_limited, fence_error, to_record

Row = tuple[Any, ...]


class SQLiteBackend(SQLiteConnection, SQLiteRegistry):
    """Store in one SQLite file. ``SQLiteBackend("state.db")`` or ``sqlite:///state.db``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        poll_interval: float = 0.5,
    ) -> None:
        super().__init__(path, busy_timeout=busy_timeout)
        self._poll_interval = poll_interval
        # Hints reach every backend object on this file in this process, not only this one.
        self._hub = shared_hub(f"sqlite:{self.path.resolve()}")
        self.calls: dict[str, int] = {}  # operation -> count, for tests and curiosity

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def poll_interval(self) -> float | None:
        return self._poll_interval

    def subscribe(self) -> AsyncIterator[str]:
        return self._hub.subscribe()

    # -- operations -----------------------------------------------------------

    async def create_run(self, new: NewRun) -> bool:
        self._count("create_run")

        def tx(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "INSERT OR IGNORE INTO runs (run_id, workflow, queue, status, created_at, "
                "due_at, log_len, parent_id, priority, concurrency_key, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.run_id,
                    new.workflow,
                    new.queue,
                    RunStatus.PENDING.value,
                    new.created_at,
                    new.due_at,
                    1 + len(new.more_records),
                    new.parent_id,
                    new.priority,
                    new.concurrency_key,
                    orjson.dumps(new.state or {}).decode(),  # what its log published so far
                ),
            )
            if cur.rowcount != 1:
                return False
            records = [new.first_record, *new.more_records]
            c.executemany(
                "INSERT INTO log (run_id, pos, data) VALUES (?, ?, ?)",
                [(new.run_id, pos, data) for pos, data in enumerate(records)],
            )
            return True

        created = await self._write(tx)
        if created:
            self._hub.publish(new.run_id)
        return created

    async def claim_due(
        self,
        *,
        queue: str,
        workflows: Collection[str],
        limit: int,
        owner: str,
        lease_seconds: float,
        now: float,
        limits: QueueLimits | None = None,
    ) -> list[Claim]:
        self._count("claim_due")
        wanted = list(set(workflows))
        if not wanted or limit <= 0:
            return []
        if limits is not None and rules.limited(limits):
            lim = limits
            return await self._write(
                lambda c: claim_limited(
                    c, queue=queue, workflows=wanted, limit=limit, owner=owner,
                    lease_seconds=lease_seconds, now=now, limits=lim,
                )
            )  # fmt: skip
        # Unlimited: one SELECT and the UPDATEs, as before limits existed.
        select = sql.claim_select(len(wanted), priority=limits is not None and limits.priority)

        def tx(c: sqlite3.Connection) -> list[Claim]:
            rows = c.execute(select, (queue, now, *wanted, now, limit)).fetchall()
            if rows:
                c.executemany(sql.CLAIM, [(now, owner, now + lease_seconds, r[0]) for r in rows])
            return [Claim(run_id=r[0], token=r[1] + 1) for r in rows]

        return await self._write(tx)

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None:
        self._count("read")

        def tx(c: sqlite3.Connection) -> Snapshot | None:
            row = c.execute(f"SELECT {sql.COLS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            rec = to_record(row)
            start = log_from if log_from >= 0 else max(0, rec.log_len + log_from)
            log = [
                r[0]
                for r in c.execute(
                    "SELECT data FROM log WHERE run_id = ? AND pos >= ? ORDER BY pos",
                    (run_id, start),
                )
            ]
            inbox = [
                InboxItem(id=r[0], data=r[1])
                for r in c.execute(
                    "SELECT id, data FROM inbox WHERE run_id = ? AND id > ? ORDER BY id",
                    (run_id, rec.inbox_pos),
                )
            ]
            return Snapshot(run=rec, log=log, inbox=inbox)

        return await self._run(tx, "BEGIN")  # one read snapshot for all three

    async def read_log_page(
        self, run_id: str, *, start: int, stop: int
    ) -> tuple[RunRecord, list[bytes]] | None:
        self._count("read_log_page")
        stmt = "SELECT data FROM log WHERE run_id = ? AND pos >= ? AND pos < ? ORDER BY pos"

        def tx(c: sqlite3.Connection) -> tuple[RunRecord, list[bytes]] | None:
            row = c.execute(f"SELECT {sql.COLS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            return to_record(row), [r[0] for r in c.execute(stmt, (run_id, start, stop))]

        return await self._run(tx, "BEGIN")  # the run and its records from one snapshot

    async def append(
        self,
        run_id: str,
        *,
        token: int,
        expected_len: int,
        records: Sequence[bytes],
        update: RunUpdate | None = None,
        now: float,
    ) -> int:
        self._count("append")
        op = Append(
            run_id=run_id,
            token=token,
            expected_len=expected_len,
            records=records,
            update=update,
            now=now,
        )
        new_len = await self._write(lambda c: append_in(c, op))
        if rules.ends_lease(update):
            self._hub.publish(run_id)
        return new_len

    async def append_batch(self, appends: Sequence[Append]) -> list[int | Exception]:
        """Group commit: every append in one transaction, each fenced on its own."""
        self._count("append_batch")

        def tx(c: sqlite3.Connection) -> list[int | Exception]:
            out: list[int | Exception] = []
            for op in appends:
                try:
                    out.append(append_in(c, op))
                except (BackendError, RunNotFound) as exc:  # refused: it changed nothing
                    out.append(exc)
            return out

        results = await self._write(tx)
        for op, res in zip(appends, results, strict=True):
            if isinstance(res, int) and rules.ends_lease(op.update):
                self._hub.publish(op.run_id)
        return results

    async def rewrite_log(
        self,
        run_id: str,
        *,
        token: int,
        expected_len: int,
        records: Sequence[bytes],
        now: float,
    ) -> int:
        self._count("rewrite_log")
        params = {"run_id": run_id, "token": token, "expected": expected_len, "n": len(records)}
        rows = [(run_id, pos, data) for pos, data in enumerate(records)]

        def tx(c: sqlite3.Connection) -> int:
            if c.execute(sql.REWRITE, params).rowcount != 1:
                raise fence_error(c, run_id, token, expected_len)
            c.execute("DELETE FROM log WHERE run_id = ?", (run_id,))
            c.executemany("INSERT INTO log (run_id, pos, data) VALUES (?, ?, ?)", rows)
            return len(rows)

        return await self._write(tx)

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        self._count("renew")
        stmt = (
            "UPDATE runs SET lease_expires_at = ? "
            "WHERE run_id = ? AND lease_token = ? AND lease_owner IS NOT NULL"
        )
        expires, pairs = now + lease_seconds, list(leases.items())

        def renew(c: sqlite3.Connection) -> set[str]:  # one transaction for all
            return {rid for rid, tok in pairs if c.execute(stmt, (expires, rid, tok)).rowcount}

        return await self._write(renew) if pairs else set()

    async def release(
        self, run_id: str, *, token: int, due_at: float | None, status: RunStatus, now: float
    ) -> bool:
        self._count("release")
        params = {
            "run_id": run_id,
            "token": token,
            "status": status.value,
            "due_at": due_at,
            "now": now,
        }
        released = await self._write(lambda c: c.execute(sql.RELEASE, params).rowcount == 1)
        if released:
            self._hub.publish(run_id)
        return released

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        self._count("deliver")

        def tx(c: sqlite3.Connection) -> int:
            row = c.execute(
                "SELECT status, last_inbox_id FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise RunNotFound(run_id)
            if RunStatus(row[0]).is_terminal:
                raise RunFinished(run_id, row[0])
            item_id: int = row[1] + 1
            c.execute(
                "UPDATE runs SET last_inbox_id = ?, due_at = ? WHERE run_id = ?",
                (item_id, now, run_id),
            )
            c.execute(
                "INSERT INTO inbox (run_id, id, data) VALUES (?, ?, ?)", (run_id, item_id, data)
            )
            return item_id

        item_id = await self._write(tx)
        self._hub.publish(run_id)
        return item_id

    async def request_cancel(self, run_id: str, *, now: float, revert: bool = False) -> None:
        self._count("request_cancel")

        def tx(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                f"UPDATE runs SET cancel_requested = 1, due_at = ?, "
                f"revert_requested = MAX(revert_requested, ?) "
                f"WHERE run_id = ? AND status NOT IN {sql.TERMINAL}",
                (now, int(revert), run_id),
            )
            if cur.rowcount == 1:
                return True
            if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise RunNotFound(run_id)
            return False  # terminal: no-op

        if await self._write(tx):
            self._hub.publish(run_id)

    async def reopen(
        self, run_id: str, *, status: RunStatus, expected_len: int, keep_len: int, now: float
    ) -> bool:
        self._count("reopen")
        args = (now, keep_len, run_id, status.value, expected_len)

        def tx(c: sqlite3.Connection) -> bool:
            if c.execute(sql.REOPEN, args).rowcount == 1:
                c.execute("DELETE FROM log WHERE run_id = ? AND pos >= ?", (run_id, keep_len))
                return True
            if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise RunNotFound(run_id)
            return False

        reopened = await self._write(tx)
        if reopened:
            self._hub.publish(run_id)
        return reopened

    async def get_run(self, run_id: str) -> RunRecord | None:
        self._count("get_run")
        stmt = f"SELECT {sql.COLS} FROM runs WHERE run_id = ?"
        row: Row | None = await self._run(lambda c: c.execute(stmt, (run_id,)).fetchone(), None)
        return None if row is None else to_record(row)

    async def list_runs(self, query: RunQuery = ALL_RUNS) -> list[RunRecord]:
        self._count("list_runs")
        stmt, args = sql.list_query(query)
        rows: list[Row] = await self._run(lambda c: c.execute(stmt, args).fetchall(), None)
        return [to_record(row) for row in rows]

    async def count_runs(self) -> RunCounts:
        self._count("count_runs")
        rows: list[Row] = await self._run(lambda c: c.execute(sql.COUNT).fetchall(), None)
        return {(wf, RunStatus(status)): n for wf, status, n in rows}

    # -- test helpers -------------------------------------------------------

    async def corrupt(self, run_id: str, position: int, data: bytes) -> None:
        """Overwrite one stored log record (to test how bad data is handled)."""
        stmt = "UPDATE log SET data = ? WHERE run_id = ? AND pos = ?"
        changed = await self._write(lambda c: c.execute(stmt, (data, run_id, position)).rowcount)
        if changed != 1:
            raise IndexError(f"run {run_id!r} has no log record #{position}")
