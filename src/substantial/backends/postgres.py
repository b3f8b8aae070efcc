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

Migrations run on :meth:`~PostgresBackend.open` (or :meth:`~PostgresBackend.migrate`)
in one transaction holding ``pg_advisory_xact_lock`` on the schema, so workers
starting together do not race; a database newer than this code raises
SchemaVersionError.

One round trip per operation, each a single statement (CTEs chaining UPDATE /
INSERT / pg_notify); asyncpg prepares and caches each per connection. A step's
append (records, no run change) is one INSERT into ``log`` fenced by a share
lock on the run row (see ``_APPEND_RECORDS``), so it costs about what a plain
insert does. Appends that also change the run (suspend, end, events taken in)
call the plpgsql function ``append_step``, which locks the run row, checks the
lease token and log length, inserts, applies the update and the release rule and
notifies, atomically. ``rewrite_log`` (compaction) calls the plpgsql function
``rewrite_log``: it locks the run row (``FOR NO KEY UPDATE``, which waits for the
appends' share lock), checks token and length, deletes the run's log and inserts
the new records at positions 0..n-1, in one transaction (readers see either log).

Connections: statements use a pool, but a connection is kept out of it between
statements (asyncpg's release costs a third of a step); lease renewals use a
connection of their own so they never queue behind steps.

Claims use ``FOR UPDATE SKIP LOCKED``: concurrent claimers skip rows another one
is locking instead of queueing behind it, so they never get the same run and
never wait for each other.

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

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg
import orjson

from .._types import RunStatus
from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    LeaseLost,
    RunFinished,
    RunNotFound,
    SchemaVersionError,
)
from ._protocol import Claim, InboxItem, NewRun, RunRecord, RunUpdate, Snapshot

T = TypeVar("T")

_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,56}$")  # + "_hints" stays <= 63 chars
_TERMINAL = [s.value for s in RunStatus if s.is_terminal]
_RETRY_DELAYS = (0.05, 0.2, 0.5)

_MIGRATIONS: tuple[str, ...] = (
    # 1: initial layout
    """
CREATE TABLE {s}.runs (
    run_id text PRIMARY KEY, workflow text NOT NULL, queue text NOT NULL,
    status text NOT NULL, created_at double precision NOT NULL,
    started_at double precision, ended_at double precision, due_at double precision,
    result text, error text, log_len bigint NOT NULL DEFAULT 0,
    inbox_pos bigint NOT NULL DEFAULT 0, last_inbox_id bigint NOT NULL DEFAULT 0,
    lease_token bigint NOT NULL DEFAULT 0, lease_owner text,
    lease_expires_at double precision, cancel_requested boolean NOT NULL DEFAULT false,
    parent_id text);
CREATE INDEX runs_due_idx ON {s}.runs (queue, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX runs_created_idx ON {s}.runs (created_at, run_id);
CREATE TABLE {s}.log (run_id text NOT NULL, pos bigint NOT NULL, data bytea NOT NULL,
    PRIMARY KEY (run_id, pos));
CREATE TABLE {s}.inbox (run_id text NOT NULL, id bigint NOT NULL, data bytea NOT NULL,
    PRIMARY KEY (run_id, id));
CREATE FUNCTION {s}.append_step(
    p_run_id text, p_token bigint, p_expected bigint, p_records bytea[],
    p_has_update boolean, p_status text, p_set_result boolean, p_result text,
    p_error text, p_ended_at double precision, p_inbox_pos bigint, p_release boolean,
    p_due_at double precision, p_now double precision, p_terminal text[], p_channel text,
    OUT o_code integer, OUT o_len bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_token bigint; v_status text; v_inbox_pos bigint; v_last bigint; v_cancel boolean;
    v_due double precision; v_owner text; v_expires double precision;
    v_released boolean := false;
BEGIN
    SELECT lease_token, log_len, status, inbox_pos, last_inbox_id, cancel_requested,
           due_at, lease_owner, lease_expires_at
      INTO v_token, o_len, v_status, v_inbox_pos, v_last, v_cancel, v_due, v_owner, v_expires
      FROM {s}.runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN o_code := 1; RETURN; END IF;            -- unknown run
    IF v_token <> p_token THEN o_code := 2; RETURN; END IF;   -- stale lease token
    IF o_len <> p_expected THEN o_code := 3; RETURN; END IF;  -- the log moved on
    INSERT INTO {s}.log (run_id, pos, data)
        SELECT p_run_id, p_expected + t.o - 1, t.d
          FROM unnest(p_records) WITH ORDINALITY AS t(d, o);
    o_len := p_expected + coalesce(cardinality(p_records), 0);
    IF p_has_update THEN
        v_status := coalesce(p_status, v_status);
        v_inbox_pos := coalesce(p_inbox_pos, v_inbox_pos);
        IF p_release OR v_status = ANY(p_terminal) THEN  -- the release rule
            v_released := true; v_owner := NULL; v_expires := NULL;
            IF v_status = ANY(p_terminal) THEN v_due := NULL;
            ELSIF v_last > v_inbox_pos OR v_cancel THEN v_due := least(p_due_at, p_now);
            ELSE v_due := p_due_at;
            END IF;
        END IF;
    END IF;
    UPDATE {s}.runs SET
        log_len = o_len, status = v_status, inbox_pos = v_inbox_pos, due_at = v_due,
        lease_owner = v_owner, lease_expires_at = v_expires,
        result = CASE WHEN p_set_result THEN p_result ELSE result END,
        error = coalesce(p_error, error), ended_at = coalesce(p_ended_at, ended_at)
     WHERE run_id = p_run_id;
    IF v_released THEN PERFORM pg_notify(p_channel, p_run_id); END IF;
    o_code := 0;
END
$fn$;
""",
    # 2: the log length is the log's own (max(pos) + 1), so a step's append is one
    # INSERT fenced by a share lock on the run row instead of an UPDATE of that row
    """
ALTER TABLE {s}.runs DROP COLUMN log_len;
CREATE OR REPLACE FUNCTION {s}.append_step(
    p_run_id text, p_token bigint, p_expected bigint, p_records bytea[],
    p_has_update boolean, p_status text, p_set_result boolean, p_result text,
    p_error text, p_ended_at double precision, p_inbox_pos bigint, p_release boolean,
    p_due_at double precision, p_now double precision, p_terminal text[], p_channel text,
    OUT o_code integer, OUT o_len bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_token bigint; v_status text; v_inbox_pos bigint; v_last bigint; v_cancel boolean;
    v_due double precision; v_owner text; v_expires double precision;
    v_released boolean := false;
BEGIN
    SELECT lease_token, status, inbox_pos, last_inbox_id, cancel_requested,
           due_at, lease_owner, lease_expires_at
      INTO v_token, v_status, v_inbox_pos, v_last, v_cancel, v_due, v_owner, v_expires
      FROM {s}.runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN o_code := 1; RETURN; END IF;            -- unknown run
    IF v_token <> p_token THEN o_code := 2; RETURN; END IF;   -- stale lease token
    SELECT coalesce(max(pos) + 1, 0) INTO o_len FROM {s}.log WHERE run_id = p_run_id;
    IF o_len <> p_expected THEN o_code := 3; RETURN; END IF;  -- the log moved on
    INSERT INTO {s}.log (run_id, pos, data)
        SELECT p_run_id, p_expected + t.o - 1, t.d
          FROM unnest(p_records) WITH ORDINALITY AS t(d, o);
    o_len := p_expected + coalesce(cardinality(p_records), 0);
    IF p_has_update THEN
        v_status := coalesce(p_status, v_status);
        v_inbox_pos := coalesce(p_inbox_pos, v_inbox_pos);
        IF p_release OR v_status = ANY(p_terminal) THEN  -- the release rule
            v_released := true; v_owner := NULL; v_expires := NULL;
            IF v_status = ANY(p_terminal) THEN v_due := NULL;
            ELSIF v_last > v_inbox_pos OR v_cancel THEN v_due := least(p_due_at, p_now);
            ELSE v_due := p_due_at;
            END IF;
        END IF;
        UPDATE {s}.runs SET
            status = v_status, inbox_pos = v_inbox_pos, due_at = v_due,
            lease_owner = v_owner, lease_expires_at = v_expires,
            result = CASE WHEN p_set_result THEN p_result ELSE result END,
            error = coalesce(p_error, error), ended_at = coalesce(p_ended_at, ended_at)
         WHERE run_id = p_run_id;
    END IF;
    IF v_released THEN PERFORM pg_notify(p_channel, p_run_id); END IF;
    o_code := 0;
END
$fn$;
""",
    # 3: rewrite_log (compaction). Separate statements: each sees the log as it is once
    # the run row is locked, and the INSERT reuses the positions the DELETE freed.
    """
CREATE FUNCTION {s}.rewrite_log(
    p_run_id text, p_token bigint, p_expected bigint, p_records bytea[],
    OUT o_code integer, OUT o_len bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_token bigint;
BEGIN
    SELECT lease_token INTO v_token FROM {s}.runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN o_code := 1; RETURN; END IF;            -- unknown run
    IF v_token <> p_token THEN o_code := 2; RETURN; END IF;   -- stale lease token
    SELECT coalesce(max(pos) + 1, 0) INTO o_len FROM {s}.log WHERE run_id = p_run_id;
    IF o_len <> p_expected THEN o_code := 3; RETURN; END IF;  -- the log moved on
    DELETE FROM {s}.log WHERE run_id = p_run_id;
    INSERT INTO {s}.log (run_id, pos, data)
        SELECT p_run_id, t.o - 1, t.d FROM unnest(p_records) WITH ORDINALITY AS t(d, o);
    o_len := coalesce(cardinality(p_records), 0);
    o_code := 0;
END
$fn$;
""",
)
LATEST_VERSION = len(_MIGRATIONS)

# Statements: {s} = quoted schema, {t} = terminal statuses (text[]), {c} = the run
# columns of ``runs r`` (the log length computed), {n} = the log length of run r.
_FIELDS = (
    "run_id", "workflow", "queue", "status", "created_at", "started_at", "ended_at", "due_at",
    "result", "error", "log_len", "inbox_pos", "lease_token", "lease_owner",
    "lease_expires_at", "cancel_requested", "parent_id",
)  # fmt: skip
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer PRIMARY KEY,
    applied_at double precision NOT NULL DEFAULT extract(epoch FROM now()))"""
_CURRENT = "SELECT coalesce(max(version), 0) FROM {s}.schema_version"
_SET_VERSION = "INSERT INTO {s}.schema_version (version) VALUES ($1)"
_CREATE = """WITH ins AS (
    INSERT INTO {s}.runs (run_id, workflow, queue, status, created_at, due_at, parent_id)
    VALUES ($1, $2, $3, 'PENDING', $4, $5, $6) ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id
), lg AS (INSERT INTO {s}.log (run_id, pos, data) SELECT run_id, 0, $7 FROM ins)
SELECT pg_notify($8, run_id) FROM ins"""
_CLAIM = """WITH picked AS MATERIALIZED (
    SELECT run_id FROM {s}.runs
     WHERE queue = $1 AND workflow = ANY($2::text[]) AND due_at <= $3::float8
       AND (lease_expires_at IS NULL OR lease_expires_at <= $3::float8) AND status <> ALL({t})
     ORDER BY due_at, created_at, run_id LIMIT $4
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {s}.runs r SET status = 'RUNNING', started_at = coalesce(r.started_at, $3::float8),
           lease_token = r.lease_token + 1, lease_owner = $5,
           lease_expires_at = $3::float8 + $6::float8
      FROM picked WHERE r.run_id = picked.run_id
    RETURNING r.run_id, r.lease_token, r.due_at, r.created_at
)
SELECT run_id, lease_token FROM claimed ORDER BY due_at, created_at, run_id"""
_READ = """SELECT {c},
    ARRAY(SELECT l.data FROM {s}.log l WHERE l.run_id = r.run_id
           AND l.pos >= CASE WHEN $2::bigint < 0 THEN {n} + $2 ELSE $2 END
         ORDER BY l.pos) AS log_data,
    ARRAY(SELECT b.id FROM {s}.inbox b WHERE b.run_id = r.run_id AND b.id > r.inbox_pos
         ORDER BY b.id) AS inbox_ids,
    ARRAY(SELECT b.data FROM {s}.inbox b WHERE b.run_id = r.run_id AND b.id > r.inbox_pos
         ORDER BY b.id) AS inbox_data
FROM {s}.runs r WHERE r.run_id = $1"""
_APPEND = "SELECT o_code, o_len FROM {s}.append_step(" + ", ".join(f"${i}" for i in range(1, 17))
_APPEND += ")"
_REWRITE = "SELECT o_code, o_len FROM {s}.rewrite_log($1, $2, $3, $4)"
# The common case, records and no run update: one INSERT. The share lock on the run
# row is the fence: it conflicts with every UPDATE of the row (a claim changing the
# token waits for this append to commit, or this append sees the new token and
# inserts nothing). The length check: position expected - 1 must exist, and the
# log's primary key refuses position expected if it does (the log moved on). No
# write of the run row: a step costs about one plain insert.
_APPEND_RECORDS = """INSERT INTO {s}.log (run_id, pos, data)
SELECT $1, $3::bigint + t.o - 1, t.d FROM unnest($4::bytea[]) WITH ORDINALITY AS t(d, o)
 WHERE EXISTS (SELECT FROM {s}.runs WHERE run_id = $1 AND lease_token = $2 FOR SHARE)
   AND ($3::bigint = 0 OR EXISTS (SELECT FROM {s}.log WHERE run_id = $1 AND pos = $3 - 1))"""
# The same for the usual single record, without the array (about 10% cheaper).
_APPEND_ONE = """INSERT INTO {s}.log (run_id, pos, data) SELECT $1, $3::bigint, $4::bytea
 WHERE EXISTS (SELECT FROM {s}.runs WHERE run_id = $1 AND lease_token = $2 FOR SHARE)
   AND ($3::bigint = 0 OR EXISTS (SELECT FROM {s}.log WHERE run_id = $1 AND pos = $3 - 1))"""
# Why a records-only append wrote nothing, in append_step's codes (see _fenced).
_FENCE = """SELECT CASE WHEN r.lease_token <> $2 THEN 2 ELSE 3 END AS o_code, {n} AS o_len
  FROM {s}.runs r WHERE r.run_id = $1"""
_RENEW = """UPDATE {s}.runs r SET lease_expires_at = $3::float8
  FROM unnest($1::text[], $2::bigint[]) AS h(run_id, token)
 WHERE r.run_id = h.run_id AND r.lease_token = h.token AND r.lease_owner IS NOT NULL
RETURNING r.run_id"""
_RELEASE = """WITH u AS (
    UPDATE {s}.runs SET
        status = CASE WHEN status = ANY({t}) THEN status ELSE $4::text END,
        due_at = CASE WHEN status = ANY({t}) OR $4::text = ANY({t}) THEN NULL
            WHEN last_inbox_id > inbox_pos OR cancel_requested THEN least($3::float8, $5::float8)
            ELSE $3::float8 END,
        lease_owner = NULL, lease_expires_at = NULL
     WHERE run_id = $1 AND lease_token = $2 AND lease_owner IS NOT NULL
    RETURNING run_id
)
SELECT pg_notify($6, run_id) FROM u"""
_DELIVER = """WITH u AS (
    UPDATE {s}.runs SET last_inbox_id = last_inbox_id + 1, due_at = $3::float8
     WHERE run_id = $1 AND status <> ALL({t})
    RETURNING run_id, last_inbox_id
), i AS (INSERT INTO {s}.inbox (run_id, id, data) SELECT run_id, last_inbox_id, $2 FROM u)
SELECT last_inbox_id, pg_notify($4, run_id) FROM u"""
_CANCEL = """WITH u AS (
    UPDATE {s}.runs SET cancel_requested = true, due_at = $2::float8
     WHERE run_id = $1 AND status <> ALL({t}) RETURNING run_id
)
SELECT pg_notify($3, run_id) FROM u"""
_STATUS = "SELECT status FROM {s}.runs WHERE run_id = $1"
_GET = "SELECT {c} FROM {s}.runs r WHERE r.run_id = $1"
_LIST = """SELECT {c} FROM {s}.runs r
 WHERE ($1::text IS NULL OR workflow = $1) AND ($2::text[] IS NULL OR status = ANY($2))
 ORDER BY created_at, run_id LIMIT $3"""
_CORRUPT = "UPDATE {s}.log SET data = $3 WHERE run_id = $1 AND pos = $2"
_DROP = "DROP SCHEMA IF EXISTS {s} CASCADE"


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(
        exc,
        OSError  # includes TimeoutError and ConnectionError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.CrashShutdownError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.TooManyConnectionsError,
    ):
        return True
    # InterfaceError is also misuse; only "connection is closed" / "pool is closing" count
    return isinstance(exc, asyncpg.InterfaceError) and "clos" in str(exc)


def _fenced(run_id: str, expected_len: int, row: Any) -> int:
    """The new log length from ``append_step`` / ``rewrite_log``'s row, or their refusal."""
    code, length = int(row["o_code"]), row["o_len"]
    if code == 1:
        raise RunNotFound(run_id)
    if code == 2:
        raise LeaseLost(run_id)
    if code == 3:
        raise LeaseLost(run_id, f"run {run_id!r}: log length is {length}, "
                                f"expected {expected_len}")  # fmt: skip
    return int(length)


def _to_record(row: Any) -> RunRecord:
    fields = {k: row[k] for k in _FIELDS}
    fields["status"] = RunStatus(fields["status"])
    if fields["result"] is not None:
        fields["result"] = orjson.loads(fields["result"])
    return RunRecord(**fields)


class PostgresBackend:
    """PostgreSQL store. ``open_backend("postgresql://user@host/db?schema=s")``."""

    def __init__(
        self,
        url: str,
        *,
        schema: str = "substantial",
        poll_interval: float = 1.0,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        if not _SCHEMA_RE.match(schema):
            raise ConfigurationError(
                f"invalid PostgreSQL schema name {schema!r}: use at most 57 letters, digits "
                "and underscores, not starting with a digit"
            )
        self._url, self._schema, self._channel = url, schema, f"{schema}_hints"
        self._poll_interval, self._min_size, self._max_size = poll_interval, min_size, max_size
        self._pool: Any = None
        self._control: Any = None  # a one-connection pool for lease renewals
        # Connections kept checked out of the pool between statements (see _call).
        self._idle: list[Any] = []
        self._waiting = 0  # calls waiting in pool.acquire(): they get released connections
        self._closed = False
        self._subscribers: set[asyncio.Queue[str | None]] = set()  # to wake them on close()
        self._open_lock = asyncio.Lock()
        self.calls: dict[str, int] = {}  # operation -> count, for tests and curiosity
        parts = urlsplit(url)
        query_secrets = [v for k, v in parse_qsl(parts.query) if k == "password" and v]
        secrets = [parts.password or "", *query_secrets]
        self._secrets = [x for p in secrets for x in {p, unquote(p)} if x]
        user, at, host = parts.netloc.rpartition("@")
        netloc = user.partition(":")[0] + at + host
        self._safe_url = f"{parts.scheme}://{netloc}{parts.path}"  # no password, no query
        terminal = "'{" + ",".join(_TERMINAL) + "}'::text[]"
        length = (
            f'(SELECT coalesce(max(l.pos) + 1, 0) FROM "{schema}".log l WHERE l.run_id = r.run_id)'
        )
        columns = ", ".join(f"{length} AS log_len" if f == "log_len" else f"r.{f}" for f in _FIELDS)
        self._fmt = {"s": f'"{schema}"', "t": terminal, "c": columns, "n": length}
        self._statements: dict[str, str] = {}

    def _sql(self, template: str) -> str:
        sql = self._statements.get(template)
        if sql is None:  # formatted once per template: this is on every step's path
            sql = self._statements[template] = template.format(**self._fmt)
        return sql

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        detail = self._redact(f"{type(exc).__name__}: {exc}")
        return BackendUnavailable(f"PostgreSQL at {self._safe_url} is unavailable ({detail})")

    @property
    def poll_interval(self) -> float | None:
        return self._poll_interval

    @property
    def schema(self) -> str:
        return self._schema

    # -- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        async with self._open_lock:
            if self._pool is not None:
                return
            self._closed = False
            delays = iter(_RETRY_DELAYS)
            while True:
                try:
                    pool = await asyncpg.create_pool(
                        self._url,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        server_settings={"application_name": f"substantial:{self._schema}"[:63]},
                        # asyncpg's default reset costs a round trip per release; our
                        # operations leave no session state (asyncpg still rolls back
                        # an open transaction and drops listeners before this runs).
                        reset=_no_reset,
                    )
                    break
                except Exception as exc:
                    if _is_connection_error(exc):
                        if (delay := next(delays, None)) is None:
                            raise self._unavailable(exc) from exc
                    elif isinstance(exc, asyncpg.PostgresError):  # auth, unknown database
                        raise self._unavailable(exc) from exc
                    elif isinstance(exc, asyncpg.InterfaceError | ValueError):
                        msg = f"bad PostgreSQL URL {self._safe_url}: {self._redact(str(exc))}"
                        raise ConfigurationError(msg) from None
                    else:
                        raise
                await asyncio.sleep(delay)
            try:
                async with pool.acquire() as conn:
                    await self._migrate_on(conn)
                # Heartbeats get their own connection (opened on first use): queued
                # behind a busy pool they would land after the leases they renew.
                control = await asyncpg.create_pool(
                    self._url, min_size=0, max_size=1, reset=_no_reset,
                    server_settings={"application_name": f"substantial-beat:{self._schema}"[:63]},
                )  # fmt: skip
            except BaseException as exc:
                pool.terminate()
                if _is_connection_error(exc):
                    raise self._unavailable(exc) from exc
                raise
            self._pool, self._control = pool, control

    async def close(self) -> None:
        pool, self._pool, self._closed = self._pool, None, True
        control, self._control = self._control, None
        idle, self._idle = self._idle, []
        for queue in self._subscribers:
            queue.put_nowait(None)
        if pool is not None:
            try:
                for conn in idle:
                    await pool.release(conn)
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                pool.terminate()
        if control is not None:
            try:
                await asyncio.wait_for(control.close(), 10)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                control.terminate()

    async def migrate(self) -> int:
        """Apply pending migrations (idempotent); returns the schema version."""
        await self.open()
        return await self._call(self._migrate_on, retry=True)

    async def _migrate_on(self, conn: Any) -> int:
        if await conn.fetchval("SELECT to_regclass($1)", f'"{self._schema}".schema_version'):
            current = int(await conn.fetchval(self._sql(_CURRENT)))
            if current == LATEST_VERSION:  # fast path: no lock, no DDL, no CREATE privilege
                return current
            self._check_version(current)
        async with conn.transaction():
            await conn.execute(_LOCK, f"substantial.migrate:{self._schema}")
            await conn.execute(self._sql("CREATE SCHEMA IF NOT EXISTS {s}"))
            await conn.execute(self._sql(_VERSION_TABLE))
            current = int(await conn.fetchval(self._sql(_CURRENT)))
            self._check_version(current)
            for version in range(current + 1, LATEST_VERSION + 1):
                await conn.execute(self._sql(_MIGRATIONS[version - 1]))
                await conn.execute(self._sql(_SET_VERSION), version)
        return LATEST_VERSION

    def _check_version(self, current: int) -> None:
        if current > LATEST_VERSION:
            raise SchemaVersionError(
                f"PostgreSQL schema {self._schema!r} is at version {current}, but this "
                f"Substantial only knows versions up to {LATEST_VERSION}: upgrade substantial"
            )

    async def _call(
        self, fn: Callable[[Any], Awaitable[T]], *, retry: bool, control: bool = False
    ) -> T:
        """Run ``fn(connection)`` on a pooled connection, translating failures.

        Connection failures while acquiring are always retried; once the statement
        may have been sent, only if ``retry`` (the operation is safe to repeat).
        ``control``: on the heartbeat's own connection, never queued behind steps."""
        pool = self._control if control else self._pool
        if pool is None:
            raise BackendError(f"the PostgreSQL store {self._safe_url} is not open")
        delays = iter(_RETRY_DELAYS)
        while True:
            sent, conn = False, None
            try:
                conn = None if control or not self._idle else self._pop_idle()
                if conn is None:
                    self._waiting += not control
                    try:
                        conn = await pool.acquire()
                    finally:
                        self._waiting -= not control
                sent = True
                result = await fn(conn)
            except BaseException as exc:
                if conn is not None:
                    if not isinstance(exc, asyncpg.PostgresError):
                        # Cut off mid-protocol (a cancel, a lost socket): asyncpg may have
                        # sent Parse without Sync, leaving the server in an open implicit
                        # transaction that holds table locks. Only closing ends it.
                        conn.terminate()
                    await pool.release(conn)
                if not isinstance(exc, Exception) or not _is_connection_error(exc):
                    if isinstance(exc, asyncpg.PostgresError):
                        raise BackendError(f"PostgreSQL error: {self._redact(str(exc))}") from exc
                    raise
                delay = next(delays, None)
                if delay is None or (sent and not retry) or pool not in (self._pool, self._control):
                    raise self._unavailable(exc) from exc
            else:
                if pool is self._pool and not self._waiting:
                    self._idle.append(conn)
                else:  # heartbeat, or someone waits in pool.acquire(), or we closed
                    await pool.release(conn)
                return result
            await asyncio.sleep(delay)

    def _pop_idle(self) -> Any:
        """An idle connection we kept, or None.

        After a statement succeeds its connection is kept here rather than released:
        asyncpg's ``release`` costs a task and several loop turns (about 70 µs, a
        third of a step), and these connections carry no session state to reset
        (no open transaction, no listeners). Dead ones are dropped: asyncpg gives
        their slot back to the pool when their socket closes."""
        while self._idle:
            conn = self._idle.pop()
            try:
                if not conn.is_closed():
                    return conn
            except asyncpg.InterfaceError:  # "released back to the pool" on close
                continue
            conn.terminate()  # closed, not yet released: this hands its slot back
        return None

    async def _q(
        self, method: str, template: str, *args: Any, retry: bool = True, control: bool = False
    ) -> Any:
        """One statement: ``conn.<method>(sql, *args)`` through :meth:`_call`."""
        sql = self._sql(template)

        async def go(conn: Any) -> Any:
            return await getattr(conn, method)(sql, *args)

        return await self._call(go, retry=retry, control=control)

    # -- operations ---------------------------------------------------------------

    async def create_run(self, new: NewRun, *, connection: Any = None) -> bool:
        """Insert the run. With ``connection`` (an asyncpg connection, typically in
        the caller's open transaction) the run exists iff the caller commits."""
        self._count("create_run")
        n = new
        args = (n.run_id, n.workflow, n.queue, n.created_at, n.due_at, n.parent_id,
                n.first_record, self._channel)  # fmt: skip
        if connection is None:  # not retried once sent: a landed first try would say False
            return len(await self._q("fetch", _CREATE, *args, retry=False)) == 1
        if self._pool is None:  # open() made sure the schema exists
            raise BackendError(f"the PostgreSQL store {self._safe_url} is not open")
        try:
            return len(await connection.fetch(self._sql(_CREATE), *args)) == 1
        except Exception as exc:
            if _is_connection_error(exc):
                raise self._unavailable(exc) from exc
            raise

    async def claim_due(
        self,
        *,
        queue: str,
        workflows: Collection[str],
        limit: int,
        owner: str,
        lease_seconds: float,
        now: float,
    ) -> list[Claim]:
        self._count("claim_due")
        args = (queue, list(workflows), now, max(limit, 0), owner, lease_seconds)
        rows = await self._q("fetch", _CLAIM, *args)
        return [Claim(run_id=r["run_id"], token=r["lease_token"]) for r in rows]

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None:
        self._count("read")
        row = await self._q("fetchrow", _READ, run_id, log_from)
        if row is None:
            return None
        pairs = zip(row["inbox_ids"], row["inbox_data"], strict=True)
        return Snapshot(
            run=_to_record(row),
            log=[bytes(d) for d in row["log_data"]],
            inbox=[InboxItem(id=i, data=bytes(d)) for i, d in pairs],
        )

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
            sql = self._sql(_APPEND_ONE if one else _APPEND_RECORDS)
            data = records[0] if one else list(records)

            async def insert(conn: Any) -> bool:
                try:
                    status: str = await conn.execute(sql, run_id, token, expected_len, data)
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
                u.has_result, result, u.error, u.ended_at, u.inbox_pos, u.release, u.due_at,
                now, _TERMINAL, self._channel)  # fmt: skip
        return _fenced(run_id, expected_len, await self._q("fetchrow", _APPEND, *args))

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
        return _fenced(run_id, expected_len, await self._q("fetchrow", _REWRITE, *args))

    async def _refused(self, run_id: str, token: int, expected_len: int) -> None:
        """Raise the reason a records-only append matched no row (the rare path)."""
        row = await self._q("fetchrow", _FENCE, run_id, token)
        _fenced(run_id, expected_len, row or {"o_code": 1, "o_len": None})
        raise LeaseLost(run_id)  # not reached: the row says why (code 2 or 3)

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        self._count("renew")
        if not leases:
            return set()
        # No deadlock: only this worker's heartbeat renews these rows (one renewal at a
        # time), and every other statement locks one row or skips locked ones.
        ids = list(leases)
        tokens, expires = [leases[r] for r in ids], now + lease_seconds
        rows = await self._q("fetch", _RENEW, ids, tokens, expires, control=True)
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
        return len(await self._q("fetch", _RELEASE, *args, retry=False)) == 1

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        self._count("deliver")
        # not retried once sent: a landed first attempt would deliver twice
        row = await self._q("fetchrow", _DELIVER, run_id, data, now, self._channel, retry=False)
        if row is not None:
            return int(row["last_inbox_id"])
        status = await self._q("fetchval", _STATUS, run_id)
        if status is None:
            raise RunNotFound(run_id)
        raise RunFinished(run_id, str(status))

    async def request_cancel(self, run_id: str, *, now: float) -> None:
        self._count("request_cancel")
        if await self._q("fetch", _CANCEL, run_id, now, self._channel):
            return
        if await self._q("fetchval", _STATUS, run_id) is None:
            raise RunNotFound(run_id)

    async def get_run(self, run_id: str) -> RunRecord | None:
        self._count("get_run")
        row = await self._q("fetchrow", _GET, run_id)
        return None if row is None else _to_record(row)

    async def list_runs(
        self,
        *,
        workflow: str | None = None,
        statuses: Collection[RunStatus] | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        self._count("list_runs")
        wanted = None if statuses is None else [RunStatus(s).value for s in statuses]
        lim = None if limit is None else max(limit, 0)
        return [_to_record(r) for r in await self._q("fetch", _LIST, workflow, wanted, lim)]

    # -- wake-ups -----------------------------------------------------------------

    def subscribe(self) -> AsyncIterator[str]:
        return self._listen()

    async def _connect_listener(self) -> Any:
        """Connect for LISTEN. A cancel that lands mid-connect would leak the socket
        asyncpg is opening, so the connect is shielded and its result closed."""
        app = f"substantial-hints:{self._schema}"[:63]
        connecting = asyncio.ensure_future(
            asyncpg.connect(self._url, timeout=10, server_settings={"application_name": app})
        )
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            connecting.add_done_callback(_terminate_when_connected)
            raise

    async def _listen(self) -> AsyncIterator[str]:
        """LISTEN on a dedicated connection; on loss reconnect with backoff, yield "".

        Ends when the backend is closed."""
        delay, connected_before = 0.1, False
        while not self._closed:
            conn: Any = None
            queue: asyncio.Queue[str | None] = asyncio.Queue()  # None = connection lost
            try:
                conn = await self._connect_listener()
                conn.add_termination_listener(lambda _c, q=queue: q.put_nowait(None))
                await conn.add_listener(
                    self._channel, lambda _c, _pid, _ch, payload, q=queue: q.put_nowait(payload)
                )
            except BaseException as exc:  # a cancel too: never leave the socket open
                if conn is not None:
                    conn.terminate()
                if not (_is_connection_error(exc) or isinstance(exc, asyncpg.PostgresError)):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._subscribers.add(queue)
            try:
                delay = 0.1
                if connected_before:
                    yield ""  # hints may have been missed while disconnected
                connected_before = True
                while not self._closed:
                    try:
                        async with asyncio.timeout(30):  # not wait_for: it can eat a cancel
                            item = await queue.get()
                    except TimeoutError:  # idle for long: check the connection still works
                        try:
                            await conn.execute("SELECT 1", timeout=10)
                        except Exception as exc:
                            if not _is_connection_error(exc):
                                raise
                            break
                        continue
                    if item is None:
                        break
                    yield item
            finally:
                self._subscribers.discard(queue)
                if not conn.is_closed():
                    try:
                        async with asyncio.timeout(5):
                            await conn.close()
                    except BaseException:
                        conn.terminate()  # cancelled or stuck: close the socket now
                        raise

    # -- test helpers -------------------------------------------------------------

    async def corrupt(self, run_id: str, position: int, data: bytes) -> None:
        """Overwrite one stored log record (to test how bad data is handled)."""
        await self._q("execute", _CORRUPT, run_id, position, data)

    async def drop_everything(self) -> None:
        """Drop the whole schema, tables, functions and all (tests use it to clean up)."""
        await self._q("execute", _DROP)


def _terminate_when_connected(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().terminate()


async def _no_reset(conn: Any) -> None:
    """Pool reset hook: nothing to undo (see ``open``)."""
    return None
