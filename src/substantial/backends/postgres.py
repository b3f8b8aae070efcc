"""The PostgreSQL store (asyncpg, one pool per backend).

Layout, inside one schema (``substantial`` unless configured; validated, always quoted):

* ``schema_version(version, applied_at)``: one row per applied migration.
* ``runs``: the :class:`RunRecord` fields (but the log length) plus
  ``last_inbox_id`` (the inbox id counter). Times are epoch seconds (double
  precision), ``status`` is text and ``result`` JSON text written by orjson (an
  exact round trip; jsonb would reorder keys and refuse ``\\u0000``). The partial
  index ``(queue, due_at) WHERE due_at IS NOT NULL`` serves claims.
* ``log(run_id, pos, data bytea)`` (primary key ``(run_id, pos)``; a run's log
  length is ``max(pos) + 1``) and ``inbox(run_id, id, data bytea)``.
* ``workers(worker_id, info, lease, last_beat)``: the worker registry (migration 5).
* ``runs.state`` (migration 9): the run's published state, jsonb, NULL for the runs
  made before (the store holds no index of those: their logs do). An append that
  publishes merges into it with ``||`` inside ``append_step`` (a published null
  stays a key); ``list_runs`` pushes ``state_equals`` down as ``state IS NULL OR
  state @> {key: value}``, served by a GIN index on ``state`` and a partial one of
  the NULL runs (see migration 9). Keys come back reordered (jsonb's order),
  values with their JSON types.
* Indexes on ``runs``: ``(created_at, run_id)`` and ``(workflow, created_at, run_id)``
  for ``list_runs`` read backwards, ``(workflow, status)`` for ``count_runs``
  (migration 7), and for limited claims (migration 8, with the columns ``priority``
  and ``concurrency_key``) ``(queue, started_at)`` of started runs (rate windows)
  and ``(queue, concurrency_key)`` of leased runs (busy slots), ``(queue,
  concurrency_key, due_at)`` of keyed runs (candidates once the unkeyed group is full).

Migrations run on :meth:`~PostgresBackend.open` (or :meth:`~PostgresBackend.migrate`)
in one transaction holding ``pg_advisory_xact_lock`` on the schema, so workers
starting together do not race; a database newer than this code raises
SchemaVersionError.

One round trip per operation, each a single statement (CTEs chaining UPDATE /
INSERT / pg_notify); asyncpg prepares and caches each per connection. A step's
append (records, no run change) is one INSERT into ``log`` fenced by a share
lock on the run row (see ``sql.APPEND_RECORDS``), so it costs about what a plain
insert does. Appends that also change the run (suspend, end, events taken in)
call the plpgsql function ``append_step``, which locks the run row, checks the
lease token and log length, inserts, applies the update and the release rule and
notifies, atomically. ``rewrite_log`` (compaction) calls the plpgsql function
``rewrite_log``: it locks the run row (``FOR NO KEY UPDATE``, which waits for the
appends' share lock), checks token and length, deletes the run's log and inserts
the new records at positions 0..n-1, in one transaction (readers see either log).

Connections (``_postgres_pool``): statements use a pool, but a connection is kept
out of it between statements (asyncpg's release costs a third of a step); lease
renewals use a connection of their own so they never queue behind steps.

Claims use ``FOR UPDATE SKIP LOCKED``: concurrent claimers skip rows another one
is locking instead of queueing behind it, so they never get the same run and
never wait for each other. That cannot enforce a count, so a claim under queue
limits (concurrency, rate) calls the plpgsql function ``claim_limited`` (migration
8) instead: it takes ``pg_advisory_xact_lock`` on (schema, queue), so limited
claims of one queue run one after the other, then counts the live leases per slot
group and the starts in the rate's window and takes the candidates the gate admits,
in that one transaction (one round trip). Unlimited claims never take that lock.

Wake-ups: changes that make a run claimable or end it ``NOTIFY`` the channel
``<schema>_hints`` with the run id, in the same statement (so the hint of a
transactional ``create_run`` is sent only if the caller commits).

Connection failures become BackendUnavailable, never showing the password.
Reads, claims, renewals, cancels, appends and rewrites are retried a few times.
Retrying an append or a rewrite after a dropped connection is safe: if the first
attempt landed, the log length moved on and the retry raises LeaseLost, which the
journal treats like any lost lease (the step stops; the run is replayed from what
the store holds); a landed rewrite that kept the length is simply written again.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from .._types import RunStatus
from ..errors import (
    BackendError,
    ConfigurationError,
    LeaseLost,
    RunFinished,
    RunNotFound,
    SchemaVersionError,
)
from . import _postgres_sql as sql
from . import _rules as rules
from ._postgres_pool import PostgresConnections, is_connection_error
from ._postgres_sql import LATEST_VERSION as LATEST_VERSION  # re-exported
from ._protocol import (
    ALL_RUNS,
    Append,
    Claim,
    Claims,
    InboxItem,
    NewRun,
    QueueLimits,
    RunCounts,
    RunQuery,
    RunRecord,
    RunUpdate,
    Snapshot,
)
from ._registry import PostgresRegistry

_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,56}$")  # + "_hints" stays <= 63 chars
_TERMINAL = [s.value for s in RunStatus if s.is_terminal]


class PostgresBackend(PostgresRegistry, PostgresConnections):
    """PostgreSQL store. ``open_backend("postgresql://user@host/db?schema=s")``.

    ``connect_timeout`` bounds each connection attempt (seconds);
    ``application_name`` is what ``pg_stat_activity`` shows for the pool (default
    ``substantial:<schema>``), with ``:beat`` and ``:hints`` appended for the
    heartbeat and LISTEN connections. Both may also be given as URL options."""

    def __init__(
        self,
        url: str,
        *,
        schema: str = "substantial",
        poll_interval: float = 1.0,
        min_size: int = 0,  # no floor: asyncpg would log a traceback per retry in an outage
        max_size: int = 10,
        connect_timeout: float = 10.0,
        application_name: str | None = None,
    ) -> None:
        if not _SCHEMA_RE.match(schema):
            raise ConfigurationError(
                f"invalid PostgreSQL schema name {schema!r}: use at most 57 letters, digits "
                "and underscores, not starting with a digit"
            )
        super().__init__(
            url,
            channel=f"{schema}_hints",
            application_name=application_name or f"substantial:{schema}",
            min_size=min_size,
            max_size=max_size,
            connect_timeout=connect_timeout,
        )
        self._schema, self._poll_interval = schema, poll_interval
        self.calls: dict[str, int] = {}  # operation -> count, for tests and curiosity
        terminal = "'{" + ",".join(_TERMINAL) + "}'::text[]"
        length = (
            f'(SELECT coalesce(max(l.pos) + 1, 0) FROM "{schema}".log l WHERE l.run_id = r.run_id)'
        )
        columns = ", ".join(
            f"{length} AS log_len" if f == "log_len" else f"r.{f}" for f in sql.FIELDS
        )
        self._fmt = {
            "s": f'"{schema}"',
            "t": terminal,
            "c": columns,
            "n": length,
            "q": f"'substantial.claim:{schema}:'",  # the limited claims' lock, per queue
        }
        self._statements: dict[str, str] = {}

    def _sql(self, template: str) -> str:
        sql = self._statements.get(template)
        if sql is None:  # formatted once per template: this is on every step's path
            sql = self._statements[template] = template.format(**self._fmt)
        return sql

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def poll_interval(self) -> float | None:
        return self._poll_interval

    @property
    def schema(self) -> str:
        return self._schema

    # -- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        """Connect (the pools) and bring the schema to the latest version."""
        await self._open_pools(self._migrate_on)

    async def migrate(self) -> int:
        """Apply pending migrations (idempotent); returns the schema version."""
        await self.open()
        return await self._call(self._migrate_on, retry=True)

    async def _migrate_on(self, conn: Any) -> int:
        if await conn.fetchval("SELECT to_regclass($1)", f'"{self._schema}".schema_version'):
            current = int(await conn.fetchval(self._sql(sql.CURRENT)))
            if current == sql.LATEST_VERSION:  # fast path: no lock, no DDL, no CREATE privilege
                return current
            self._check_version(current)
        async with conn.transaction():
            await conn.execute(sql.LOCK, f"substantial.migrate:{self._schema}")
            await conn.execute(self._sql("CREATE SCHEMA IF NOT EXISTS {s}"))
            await conn.execute(self._sql(sql.VERSION_TABLE))
            current = int(await conn.fetchval(self._sql(sql.CURRENT)))
            self._check_version(current)
            for version in range(current + 1, sql.LATEST_VERSION + 1):
                await conn.execute(self._sql(sql.MIGRATIONS[version - 1]))
                await conn.execute(self._sql(sql.SET_VERSION), version)
        return sql.LATEST_VERSION

    def _check_version(self, current: int) -> None:
        if current > sql.LATEST_VERSION:
            raise SchemaVersionError(
                f"PostgreSQL schema {self._schema!r} is at version {current}, but this "
                f"Substantial only knows versions up to {sql.LATEST_VERSION}: upgrade substantial"
            )

    async def _q(
        self, method: str, template: str, *args: Any, retry: bool = True, control: bool = False
    ) -> Any:
        """One statement: ``conn.<method>(sql, *args)`` through :meth:`_call`."""
        stmt = self._sql(template)

        async def go(conn: Any) -> Any:
            return await getattr(conn, method)(stmt, *args)

        return await self._call(go, retry=retry, control=control)

    # -- operations ---------------------------------------------------------------

    async def create_run(self, new: NewRun) -> bool:
        self._count("create_run")
        # not retried once sent: a first try that landed would then say False
        stmt, args = self._create(new)
        return len(await self._q("fetch", stmt, *args, retry=False)) == 1

    async def create_run_in(self, new: NewRun, connection: Any) -> bool:
        """Insert the run through the caller's asyncpg ``connection``, typically in
        its open transaction: the run exists iff the caller commits
        (:class:`~substantial.backends.JoinsTransactions`)."""
        self._count("create_run")
        if self._pool is None:  # open() made sure the schema exists
            raise BackendError(f"the PostgreSQL store {self._safe_url} is not open")
        try:
            stmt, args = self._create(new)
            return len(await connection.fetch(self._sql(stmt), *args)) == 1
        except Exception as exc:
            if is_connection_error(exc):
                raise self._unavailable(exc) from exc
            raise

    def _create(self, n: NewRun) -> tuple[str, tuple[Any, ...]]:
        """``create_run``'s statement template and arguments: a run with a priority,
        a slot group or a published state (a fork's prefix published) also sets
        those columns (``sql.CREATE_FULL``); any other is inserted by the statement
        that predates them, its state the column's default, ``{}``."""
        args = (n.run_id, n.workflow, n.queue, n.created_at, n.due_at, n.parent_id,
                n.first_record, self._channel, list(n.more_records))  # fmt: skip
        if n.priority == 0 and n.concurrency_key is None and not n.state:
            return sql.CREATE, args
        return sql.CREATE_FULL, (
            *args,
            n.priority,
            n.concurrency_key,
            sql.state_json(n.state or {}),
        )

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
        args = (queue, list(workflows), now, max(limit, 0), owner, lease_seconds)
        if limits is not None and rules.limited(limits):
            # One call, serialized per queue by an advisory lock (see sql.CLAIM_LIMITED_FUNCTION)
            lim = (limits.concurrency, limits.rate, limits.period, limits.priority)
            row = await self._q("fetchrow", sql.CLAIM_LIMITED, *args, *lim)
            pairs = zip(row["o_ids"], row["o_tokens"], strict=True)
            return Claims((Claim(run_id=r, token=t) for r, t in pairs), held_until=row["o_held"])
        template = (
            sql.CLAIM_READ_PRIORITY if limits is not None and limits.priority else sql.CLAIM_READ
        )
        rows = await self._q("fetch", template, *args)
        return [
            Claim(run_id=r["run_id"], token=r["lease_token"], snapshot=_snapshot(r)) for r in rows
        ]

    async def next_due(self, *, queue: str, workflows: Collection[str], now: float) -> float | None:
        self._count("next_due")
        found = await self._q("fetchval", sql.NEXT_DUE, queue, list(workflows))
        return None if found is None else float(found)

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None:
        self._count("read")
        row = await self._q("fetchrow", sql.READ, run_id, log_from)
        return None if row is None else _snapshot(row)

    async def read_log_page(
        self, run_id: str, *, start: int, stop: int
    ) -> tuple[RunRecord, list[bytes]] | None:
        self._count("read_log_page")
        row = await self._q("fetchrow", sql.READ_PAGE, run_id, start, stop)
        return None if row is None else (sql.to_record(row), [bytes(d) for d in row["log_data"]])

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
        if update is None and records:
            one = len(records) == 1
            stmt = self._sql(sql.APPEND_ONE if one else sql.APPEND_RECORDS)
            data = records[0] if one else list(records)

            async def insert(conn: Any) -> bool:
                try:
                    status: str = await conn.execute(stmt, run_id, token, expected_len, data)
                    return status != "INSERT 0 0"
                except asyncpg.UniqueViolationError:
                    return False  # a record is already at that position: the log moved on

            # Retried: if a first attempt landed, the retry hits the primary key.
            if not await self._call(insert, retry=True):
                await self._refused(run_id, token, expected_len)
            return expected_len + len(records)
        u = update or RunUpdate()
        result = orjson.dumps(u.result).decode() if u.has_result else None
        status = None if u.status is None else u.status.value
        args = (run_id, token, expected_len, list(records), update is not None, status,
                u.has_result, result, u.error, u.error_type, u.ended_at, u.inbox_pos,
                u.release, u.due_at, now, _TERMINAL, self._channel,
                sql.published_json(u.state))  # fmt: skip
        return sql.fenced(run_id, expected_len, await self._q("fetchrow", sql.APPEND, *args))

    async def append_batch(self, appends: Sequence[Append]) -> list[int | Exception]:
        """Group commit: every append in one statement, one transaction (see
        ``sql.APPEND_BATCH``), each fenced on its own. Retried like ``append``: a
        landed first attempt makes each retried append refuse (the log moved)."""
        self._count("append_batch")
        order = sorted(range(len(appends)), key=lambda i: appends[i].run_id)  # lock order
        cols: list[list[Any]] = [[] for _ in range(17)]
        flat: list[bytes] = []
        for op in (appends[i] for i in order):
            u = op.update or RunUpdate()
            lo = len(flat) + 1
            flat.extend(op.records)
            row = (op.run_id, op.token, op.expected_len, lo, len(flat), op.update is not None,
                   None if u.status is None else u.status.value, u.has_result,
                   orjson.dumps(u.result).decode() if u.has_result else None, u.error,
                   u.error_type, u.ended_at, u.inbox_pos, u.release, u.due_at, op.now,
                   sql.published_json(u.state))  # fmt: skip
            for col, v in zip(cols, row, strict=True):
                col.append(v)
        args = (*cols[:15], flat, cols[15], _TERMINAL, self._channel, cols[16])
        rows = await self._q("fetch", sql.APPEND_BATCH, *args)
        out: list[int | Exception] = [0] * len(appends)
        for i, row in zip(order, rows, strict=True):
            op = appends[i]
            try:
                out[i] = sql.fenced(op.run_id, op.expected_len, row)
            except (BackendError, RunNotFound) as exc:
                out[i] = exc
        return out

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
        # Retried: a landed first attempt makes the retry's length check fail (LeaseLost)
        # unless the length did not change, when it writes the same records again.
        args = (run_id, token, expected_len, list(records))
        return sql.fenced(run_id, expected_len, await self._q("fetchrow", sql.REWRITE, *args))

    async def _refused(self, run_id: str, token: int, expected_len: int) -> None:
        """Raise the reason a records-only append matched no row (the rare path)."""
        row = await self._q("fetchrow", sql.FENCE, run_id, token)
        sql.fenced(run_id, expected_len, row or {"o_code": 1, "o_len": None})
        raise LeaseLost(run_id)  # not reached: the row says why (code 2 or 3)

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        self._count("renew")
        if not leases:
            return set()
        # No deadlock: only this worker's heartbeat renews these rows (one renewal at a
        # time); a batch of appends locks rows in the same (run_id) order, and every
        # other statement locks one row or skips locked ones.
        ids = list(leases)
        tokens, expires = [leases[r] for r in ids], now + lease_seconds
        rows = await self._q("fetch", sql.RENEW, ids, tokens, expires, control=True)
        return {row["run_id"] for row in rows}

    async def release(
        self,
        run_id: str,
        *,
        token: int,
        due_at: float | None,
        status: RunStatus,
        now: float,
    ) -> bool:
        self._count("release")
        args = (run_id, token, due_at, status.value, now, self._channel)
        # not retried once sent: a landed first attempt would make the retry say False
        return len(await self._q("fetch", sql.RELEASE, *args, retry=False)) == 1

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        self._count("deliver")
        # not retried once sent: a landed first attempt would deliver twice
        row = await self._q("fetchrow", sql.DELIVER, run_id, data, now, self._channel, retry=False)
        if row is not None:
            return int(row["last_inbox_id"])
        status = await self._q("fetchval", sql.STATUS, run_id)
        if status is None:
            raise RunNotFound(run_id)
        raise RunFinished(run_id, str(status))

    async def request_cancel(self, run_id: str, *, now: float, revert: bool = False) -> None:
        self._count("request_cancel")
        if await self._q("fetch", sql.CANCEL, run_id, now, self._channel, revert):
            return
        if await self._q("fetchval", sql.STATUS, run_id) is None:
            raise RunNotFound(run_id)

    async def reopen(
        self, run_id: str, *, status: RunStatus, expected_len: int, keep_len: int, now: float
    ) -> bool:
        self._count("reopen")
        args = (run_id, status.value, expected_len, keep_len, now, self._channel)
        # retried: a landed first attempt makes the retry find PENDING and say False
        if await self._q("fetch", sql.REOPEN, *args):
            return True
        if await self._q("fetchval", sql.STATUS, run_id) is None:
            raise RunNotFound(run_id)
        return False

    async def get_run(self, run_id: str) -> RunRecord | None:
        self._count("get_run")
        row = await self._q("fetchrow", sql.GET, run_id)
        return None if row is None else sql.to_record(row)

    async def list_runs(self, query: RunQuery = ALL_RUNS) -> list[RunRecord]:
        self._count("list_runs")
        template, args = sql.list_query(query)
        return [sql.to_record(r) for r in await self._q("fetch", template, *args)]

    async def count_runs(self) -> RunCounts:
        self._count("count_runs")
        rows = await self._q("fetch", sql.COUNT)
        return {(r["workflow"], RunStatus(r["status"])): int(r["n"]) for r in rows}

    # -- wake-ups -----------------------------------------------------------------

    def subscribe(self) -> AsyncIterator[str]:
        return self._listen()

    # -- test helpers -------------------------------------------------------------

    async def corrupt(self, run_id: str, position: int, data: bytes) -> None:
        """Overwrite one stored log record (to test how bad data is handled)."""
        await self._q("execute", sql.CORRUPT, run_id, position, data)

    async def drop_everything(self) -> None:
        """Drop the whole schema, tables, functions and all (tests use it to clean up)."""
        await self._q("execute", sql.DROP)


def _snapshot(row: Any) -> Snapshot:
    """A READ-shaped row (the run's columns, log_data, inbox_ids, inbox_data)."""
    pairs = zip(row["inbox_ids"], row["inbox_data"], strict=True)
    return Snapshot(
        run=sql.to_record(row),
        log=[bytes(d) for d in row["log_data"]],
        inbox=[InboxItem(id=i, data=bytes(d)) for i, d in pairs],
    )
