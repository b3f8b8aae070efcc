"""The SQLite store's connection: one file, one connection, one thread for it.

Kept apart from the operations (``sqlite.py``, which says why it is built this
way): connecting with the busy timeout first and WAL, creating or upgrading the
schema (``_sqlite_sql.SCHEMA`` / ``UPGRADES``) in one BEGIN IMMEDIATE transaction
that concurrent openers take turns at, and running each operation as one job on
the connection's thread, in a transaction of its own.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..errors import BackendError, BackendUnavailable, SchemaVersionError
from . import _sqlite_sql as sql

T = TypeVar("T")

SCHEMA_VERSION = 5  # 1: the first layout; 2: runs.error_type, index runs_wf_created;
# 3: the workers table (the worker registry); 4: runs.revert_requested; 5: index
# runs_wf_status (count_runs)


def _transact(
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


def _busy(exc: BaseException) -> bool:
    """Whether SQLite refused because another connection holds the file."""
    text = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _wrap(exc: sqlite3.Error) -> BackendError:
    msg = f"sqlite: {exc}"
    return BackendUnavailable(msg) if _busy(exc) else BackendError(msg)


class SQLiteConnection:
    """The connection of one SQLite store and the thread that owns it (the base of
    SQLiteBackend); ``_run`` / ``_write`` run an operation there."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used only on the executor's thread

    def _connect(self) -> sqlite3.Connection:
        """A configured connection (autocommit; transactions are explicit).

        The busy timeout comes first, so every later statement waits for a
        concurrent opener instead of failing; switching to WAL is skipped when the
        file is already in WAL mode (the switch needs the file to itself)."""
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self) -> None:
        """On the worker thread: connect, then create or check the schema.

        Several processes may open a fresh file at the same moment. SQLite reports
        some of those collisions as busy without waiting (a WAL switch or a WAL
        recovery in another connection), so setup as a whole is retried until the
        busy timeout has passed; each attempt is harmless to repeat."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.005
        while True:
            try:
                conn = self._connect()
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
            else:
                try:
                    self._prepare(conn)
                except BaseException as exc:
                    conn.close()
                    if not _busy(exc) or time.monotonic() > deadline:
                        raise
                else:
                    self._conn = conn
                    return
            time.sleep(pause * (1 + random.random()))
            pause = min(pause * 2, 0.2)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """The schema at SCHEMA_VERSION: a read when it already is, else one write
        transaction (BEGIN IMMEDIATE: concurrent openers take turns, then see it done)."""
        if self._version(conn) == SCHEMA_VERSION:
            return
        _transact(conn, "BEGIN IMMEDIATE", self._create_schema)

    @staticmethod
    def _version(c: sqlite3.Connection) -> int | None:
        try:
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        return None if row is None else int(row[0])

    def _create_schema(self, c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        found = self._version(c)
        if found is not None and found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has schema version {found}, written by a newer Substantial; "
                f"this version understands up to {SCHEMA_VERSION}"
            )
        if found is None:  # a fresh file; not executescript(): it would COMMIT first
            for stmt in filter(str.strip, sql.SCHEMA.split(";")):
                c.execute(stmt)
        else:
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for stmt in sql.UPGRADES[version]:
                    c.execute(stmt)
        c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))

    def _teardown(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T], begin: str | None) -> T:
        """Run ``fn`` on the worker thread, in a transaction unless ``begin`` is None."""
        executor = self._executor
        if executor is None:
            raise BackendError(f"SQLite store {self.path} is not open")

        def job() -> T:
            if self._conn is None:  # open() failed while this job was queued
                raise BackendError(f"SQLite store {self.path} is not open")
            return _transact(self._conn, begin, fn)

        try:
            return await asyncio.get_running_loop().run_in_executor(executor, job)
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(fn, "BEGIN IMMEDIATE")

    async def migrate(self) -> int:
        """Opening applies pending upgrades; returns the schema version."""
        await self.open()
        return SCHEMA_VERSION

    async def open(self) -> None:
        if self._executor is not None:
            return
        # Set before the setup job runs: later jobs queue behind it on the one thread.
        self._executor = executor = ThreadPoolExecutor(1, thread_name_prefix="substantial-sqlite")
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._setup)
        except BaseException as exc:
            self._executor = None
            executor.shutdown(wait=False)
            if isinstance(exc, sqlite3.Error):
                raise _wrap(exc) from exc
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._teardown)
        finally:
            executor.shutdown(wait=False)
