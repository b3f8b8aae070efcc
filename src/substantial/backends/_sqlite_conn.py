"""The SQLite store's connection: one file, one connection, one thread for it.

Kept apart from the operations (``sqlite.py``, which says why it is built this
way): connecting with the busy timeout first and WAL, creating or upgrading the
schema (``_sqlite_sql.SCHEMA`` / ``UPGRADES``) in one BEGIN IMMEDIATE transaction
that concurrent openers take turns at, and running each operation as one job on
the connection's thread, in a transaction of its own, or, for a write that
needs no waiting, inline on the event loop (see ``_write``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..errors import BackendError, SchemaVersionError
from . import _sqlite_sql as sql
from ._sqlite_tx import is_busy, merged_state, transact, wrap

T = TypeVar("T")

CHECKPOINT_EVERY = 1000  # writes between two WAL checkpoints (SQLite's default: 1000 pages)
SCHEMA_VERSION = 7  # 1: the first layout; 2: runs.error_type, index runs_wf_created;
# 3: the workers table (the worker registry); 4: runs.revert_requested; 5: index
# runs_wf_status (count_runs); 6: runs.priority and runs.concurrency_key, indexes
# runs_started, runs_leased and runs_keyed (queue limits); 7: runs.state (published
# state, JSON text; NULL for the runs made before)


class SQLiteConnection:
    """The connection of one SQLite store and the thread that owns it (the base of
    SQLiteBackend); ``_run`` / ``_write`` run an operation there."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        # Whoever uses the connection holds this: a job on the executor's thread, or
        # a write made inline on the event loop (see _write).
        self._lock = threading.Lock()
        self._commits = 0  # writes since the last checkpoint (see _committed)

    def _connect(self) -> sqlite3.Connection:
        """A configured connection (autocommit; transactions are explicit).

        The busy timeout comes first, so every later statement waits for a
        concurrent opener instead of failing; switching to WAL is skipped when the
        file is already in WAL mode (the switch needs the file to itself). Appends
        that publish call ``sql.MERGE_STATE``, registered here on every connection."""
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.create_function(sql.MERGE_STATE, 2, merged_state, deterministic=True)
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
                if not is_busy(exc) or time.monotonic() > deadline:
                    raise
            else:
                try:
                    self._prepare(conn)
                except BaseException as exc:
                    conn.close()
                    if not is_busy(exc) or time.monotonic() > deadline:
                        raise
                else:
                    # From now on a statement never waits unless a job asks to (see
                    # _job), and checkpoints run on this thread (see _committed).
                    conn.execute("PRAGMA busy_timeout = 0")
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
                    self._conn = conn
                    return
            time.sleep(pause * (1 + random.random()))
            pause = min(pause * 2, 0.2)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """The schema at SCHEMA_VERSION: a read when it already is, else one write
        transaction (BEGIN IMMEDIATE: concurrent openers take turns, then see it done)."""
        if self._version(conn) == SCHEMA_VERSION:
            return
        transact(conn, "BEGIN IMMEDIATE", self._create_schema)

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
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T], begin: str | None) -> T:
        """Run ``fn`` on the worker thread, in a transaction unless ``begin`` is None."""
        executor = self._executor
        if executor is None:
            raise BackendError(f"SQLite store {self.path} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, self._job, fn, begin)
        except sqlite3.Error as exc:
            raise wrap(exc) from exc

    def _job(self, fn: Callable[[sqlite3.Connection], T], begin: str | None) -> T:
        """On the worker thread: ``fn`` in its transaction, waiting for locks other
        processes hold up to the busy timeout."""
        with self._lock:
            conn = self._conn
            if conn is None:  # open() failed, or close() ran, while this job was queued
                raise BackendError(f"SQLite store {self.path} is not open")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            try:
                out = transact(conn, begin, fn)
            finally:
                conn.execute("PRAGMA busy_timeout = 0")
        if begin is not None and begin != "BEGIN":
            self._committed()
        return out

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A write transaction: inline on the event loop when the connection is free
        and no other process holds the write lock, else on the worker thread.

        Inline, a write costs what SQLite does (BEGIN IMMEDIATE, the statements,
        COMMIT: no fsync in WAL with synchronous=NORMAL), not a hop to a thread and
        back; it never waits, since the busy timeout is 0 outside jobs: a lock held
        elsewhere sends the write to the thread, which waits for it there. Under
        such waits, appends queue up behind and go as one batch (group commit)."""
        conn = self._conn
        if conn is not None and self._executor is not None and self._lock.acquire(False):
            try:
                out = transact(conn, "BEGIN IMMEDIATE", fn)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise wrap(exc) from exc
                # another process holds the write lock: wait for it on the thread
            except sqlite3.Error as exc:
                raise wrap(exc) from exc
            else:
                self._committed()
                return out
            finally:
                self._lock.release()
        return await self._run(fn, "BEGIN IMMEDIATE")

    def _committed(self) -> None:
        """Count a write; every CHECKPOINT_EVERY, checkpoint the WAL on the thread
        (never inline: a checkpoint syncs the database file)."""
        self._commits += 1
        executor = self._executor
        if self._commits >= CHECKPOINT_EVERY and executor is not None:
            self._commits = 0
            executor.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):  # busy: the next one catches up
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

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
                raise wrap(exc) from exc
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._teardown)
        finally:
            executor.shutdown(wait=False)
