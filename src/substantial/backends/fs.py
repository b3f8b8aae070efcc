"""The file-system store (``file:///dir``): plain files, shared by processes on one machine.

Layout under ``root`` (``<name>`` is an id made safe for a path, see ``_fs_layout.file_name``)::

    format                     store format version, created once ("1")
    tmp/                       runs being created (renamed into runs/ when complete)
    runs/<name>/run.json       the RunRecord as JSON, plus last_inbox_id, log_bytes and,
                               once the log was rewritten, log_gen
    runs/<name>/log            the log: records framed as 4-byte big-endian length + bytes;
    runs/<name>/log.<gen>      log_gen > 0 names this file instead (see rewrite_log below)
    runs/<name>/inbox/<id>     one file per delivered item, id as %08d
    runs/<name>/lock           flock(LOCK_EX) by every writer of the run
    queues/<name>/index.json   due index: run_id -> [due_at, lease_expires_at, workflow,
                               created_at, started, priority, concurrency_key] (the tail cut
                               after its last non-default field), so claim_due never reads
                               every run
    queues/<name>/starts.json  first-claim times of the queue's rate-limited claims, in
                               the rate's window (see _fs_claim)
    queues/<name>/lock         flock(LOCK_EX) by every writer of index.json and starts.json,
                               and every change of a lease of the queue's runs
    workers/<name>.json        the worker registry: one entry per worker (see _registry)

Why this is safe with several processes:

* ``run.json`` is only ever replaced whole (write ``run.json.tmp``, ``os.replace``) under
  the run lock, and it is the commit point of every operation: data it points to (log
  bytes up to ``log_bytes``, inbox files up to ``last_inbox_id``) is written first and
  never changes afterwards. Readers therefore take no lock: one ``run.json`` is a
  consistent snapshot, and bytes past ``log_bytes`` (a torn append) are ignored, then cut
  by the next append.
* ``rewrite_log`` (compaction) never touches the committed log: it writes the new one
  whole to ``log.<gen + 1>`` (unseen until committed), then commits ``run.json`` naming it,
  then deletes the older log files. A crash leaves the old log or the new one (plus a file
  nobody reads, deleted by the next rewrite); a reader whose log vanished under it after
  it read ``run.json`` reads ``run.json`` again.
* A run is created complete in ``tmp/`` and published with one ``os.rename`` of the
  directory, which fails when the target exists: the loser of a race returns False and
  nobody ever sees half a run.
* Locks are always taken queue first, then run; a plain append (no release, not
  terminal) and a renew that extends a live lease take only the run lock (neither
  changes which runs hold a slot or are claimable, so queue limits hold: _fs_claim).
* The index is a hint that is never *later* than the truth (entry missing only if the
  run has no due_at or is terminal; indexed due_at and lease never above the real ones).
  So it may only be lowered before ``run.json`` changes and raised after: a crash in
  between leaves an entry that is too eager, which ``claim_due`` re-checks against
  ``run.json`` (under the run lock) and repairs. A too-late entry would strand a run.

``fsync=True`` (the default) also makes every commit survive a power cut (file fsync
before each rename, directory fsync after); ``fsync=False`` only survives process crashes.
Hints (``subscribe``) are in-process only; other processes are found by polling.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import orjson

from .._types import RunStatus
from ..errors import RunFinished, RunNotFound, SchemaVersionError
from . import _rules as rules
from ._fs_claim import Ask, Claimer
from ._fs_layout import (
    FORMAT,
    Entry,
    State,
    Txn,
    Writer,
    dump,
    eager,
    entry,
    file_name,
    flock,
    frame,
    load_state,
    log_path,
    read_index,
    read_log,
)
from ._hub import shared_hub
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
from ._registry import FsRegistry


class FSBackend(FsRegistry):
    """Store in a directory. ``FSBackend("/var/lib/app")`` or ``open_backend("file:///...")``.

    Each operation is one hop to a worker thread, since flock waits and fsyncs block.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, poll_interval: float = 0.5, fsync: bool = True
    ) -> None:
        self._root = Path(root)
        self._runs = self._root / "runs"
        self._queues = self._root / "queues"
        self._tmp = self._root / "tmp"
        self._poll = poll_interval
        self._files = Writer(fsync)
        self._known_queues: set[str] = set()
        # Hints reach every backend object on this directory in this process.
        self._hub = shared_hub(f"file:{self._root.resolve()}")
        self.calls: dict[str, int] = {}  # operation -> count, for tests and curiosity

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def poll_interval(self) -> float:
        return self._poll

    def subscribe(self) -> AsyncIterator[str]:
        return self._hub.subscribe()

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    async def close(self) -> None:
        return None

    # -- files --------------------------------------------------------------

    def _open(self) -> None:
        for d in (self._runs, self._queues, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        fmt = self._root / "format"
        if not fmt.exists():
            tmp = self._tmp / uuid.uuid4().hex
            self._files.write_new(tmp, b"%d\n" % FORMAT)
            try:
                os.link(tmp, fmt)  # create-if-missing, atomically
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        found = int(fmt.read_bytes().strip() or b"0")
        if found > FORMAT:
            raise SchemaVersionError(
                f"{self._root} holds store format {found}; this Substantial reads up to {FORMAT}"
            )
        for leftover in self._tmp.iterdir():  # creations abandoned by a crash
            with suppress(FileNotFoundError):  # or just published by another process
                if leftover.stat().st_mtime < time.time() - 3600:
                    shutil.rmtree(leftover, ignore_errors=True)

    def _run_dir(self, run_id: str) -> Path:
        return self._runs / file_name(run_id)

    def _queue_dir(self, queue: str) -> Path:
        d = self._queues / file_name(queue)
        if queue not in self._known_queues:
            d.mkdir(parents=True, exist_ok=True)
            self._known_queues.add(queue)
        return d

    def _set_entry(self, qdir: Path, idx: dict[str, Entry], run_id: str, e: Entry | None) -> None:
        if idx.get(run_id) == e:
            return
        if e is None:
            del idx[run_id]
        else:
            idx[run_id] = e
        self._files.replace(qdir / "index.json", orjson.dumps(idx))

    @contextmanager
    def _txn(self, run_id: str, *, indexed: bool) -> Iterator[Txn | None]:
        """Lock a run for writing (queue lock first when its index may change)."""
        d = self._run_dir(run_id)
        peek = load_state(d)  # unlocked: only to learn the queue, which never changes
        if peek is None:
            yield None
            return
        with ExitStack() as locks:
            qdir = None
            if indexed:
                qdir = self._queue_dir(peek.rec.queue)
                locks.enter_context(flock(qdir / "lock"))
            locks.enter_context(flock(d / "lock"))
            st = load_state(d)
            assert st is not None  # runs are never deleted
            yield Txn(d, st, qdir)

    def _commit(self, t: Txn, st: State) -> None:
        """Write run.json; keep the index never later than it (see module docstring)."""
        if t.qdir is None:
            self._files.replace(t.dir / "run.json", dump(st))
            return
        rid, want = st.rec.run_id, entry(st.rec)
        idx = read_index(t.qdir)
        low = eager(idx.get(rid), want)
        self._set_entry(t.qdir, idx, rid, low)
        self._files.replace(t.dir / "run.json", dump(st))
        self._set_entry(t.qdir, idx, rid, want)

    # -- the protocol: each operation is one sync function run in a worker thread --

    async def create_run(self, new: NewRun) -> bool:
        self._count("create_run")
        if await asyncio.to_thread(self._create_run, new):
            self._hub.publish(new.run_id)
            return True
        return False

    def _create_run(self, new: NewRun) -> bool:
        d = self._run_dir(new.run_id)
        if d.exists():
            return False
        rec = rules.new_record(new)
        log = frame([new.first_record, *new.more_records])
        tmp = self._tmp / uuid.uuid4().hex
        (tmp / "inbox").mkdir(parents=True)
        self._files.write_new(tmp / "lock", b"")
        self._files.write_new(tmp / "log", log)
        self._files.write_new(tmp / "run.json", dump(State(rec, 0, len(log))))
        self._files.sync_dir(tmp)
        with ExitStack() as locks:
            qdir, idx, want = None, {}, entry(rec)
            if want is not None:  # index it before it exists: eager is safe, late is not
                qdir = self._queue_dir(new.queue)
                locks.enter_context(flock(qdir / "lock"))
                if d.exists():
                    shutil.rmtree(tmp)
                    return False
                idx = read_index(qdir)
                self._set_entry(qdir, idx, new.run_id, eager(idx.get(new.run_id), want))
            try:
                os.rename(tmp, d)  # fails if d exists (it is never empty)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(tmp)
                if qdir is not None:  # the winner's entry, if any, is in another queue
                    self._set_entry(qdir, idx, new.run_id, None)
                return False
            self._files.sync_dir(self._runs)
            if qdir is not None:
                self._set_entry(qdir, idx, new.run_id, want)
        return True

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
        """Under the queue lock; the limits are enforced there too (``_fs_claim``)."""
        self._count("claim_due")
        if limit <= 0:
            return Claims()
        ask = Ask(queue, set(workflows), limit, owner, lease_seconds, now, limits)

        def claim() -> Claims:
            return Claimer(self._queue_dir(queue), self._run_dir, self._files).claim(ask)

        return await asyncio.to_thread(claim)

    def _committed(self, run_id: str, log_from: int) -> tuple[Path, State, list[bytes]] | None:
        """run.json and the log it commits, from ``log_from``; lock-free (run.json is a
        consistent snapshot; a log a rewrite removed meanwhile means: read it again)."""
        d = self._run_dir(run_id)
        st = load_state(d)
        if st is None:
            return None
        while True:
            try:
                return d, st, read_log(run_id, d, st, log_from)
            except FileNotFoundError:  # a rewrite_log since we read run.json?
                newer = load_state(d)
                if newer is None or newer.log_gen == st.log_gen:
                    raise
                st = newer

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None:
        self._count("read")

        def read() -> Snapshot | None:
            found = self._committed(run_id, log_from)
            if found is None:
                return None
            d, st, log = found
            inbox = [
                InboxItem(id=i, data=(d / "inbox" / f"{i:08d}").read_bytes())
                for i in range(st.rec.inbox_pos + 1, st.last_inbox_id + 1)
            ]
            return Snapshot(run=st.rec, log=log, inbox=inbox)

        return await asyncio.to_thread(read)

    async def read_log_page(
        self, run_id: str, *, start: int, stop: int
    ) -> tuple[RunRecord, list[bytes]] | None:
        """The log file is read whole (its records are framed one after the other);
        only the slice is returned."""
        self._count("read_log_page")
        found = await asyncio.to_thread(self._committed, run_id, start)
        return None if found is None else (found[1].rec, found[2][: max(0, stop - start)])

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
        n, released = await asyncio.to_thread(self._append_now, op)
        if released:
            self._hub.publish(run_id)
        return n

    async def append_batch(self, appends: Sequence[Append]) -> list[int | Exception]:
        """Group commit, as files allow: each file is synced on its own whatever
        happens, so the batch's appends go to threads side by side, their syncs
        overlapping (one thread syncing them in turn made 200 concurrent runs
        about 20% slower), each under its own run's lock and fenced on its own."""
        self._count("append_batch")

        async def one(op: Append) -> int | Exception:
            try:
                n, released = await asyncio.to_thread(self._append_now, op)
            except Exception as exc:  # this append's own outcome, as append() raises it
                return exc
            if released:
                self._hub.publish(op.run_id)
            return n

        return list(await asyncio.gather(*(one(op) for op in appends)))

    def _append_now(self, op: Append) -> tuple[int, bool]:
        """``op`` on this thread: the new log length, and whether it released the run."""
        data = frame(op.records)
        with self._txn(op.run_id, indexed=rules.ends_lease(op.update)) as t:
            if t is None:
                raise RunNotFound(op.run_id)
            st, rec = t.st, t.st.rec
            rules.check_fence(op.run_id, rec, op.token, op.expected_len)
            self._files.append_at(log_path(t.dir, st), st.log_bytes, data)
            rec, released = rules.appended(
                rec,
                op.update,
                log_len=rec.log_len + len(op.records),
                last_inbox_id=st.last_inbox_id,
                now=op.now,
            )
            self._commit(t, replace(st, rec=rec, log_bytes=st.log_bytes + len(data)))
            return rec.log_len, released

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
        data = frame(records)

        def rewrite() -> int:
            with self._txn(run_id, indexed=False) as t:  # lease and due time stay: no index
                if t is None:
                    raise RunNotFound(run_id)
                rules.check_fence(run_id, t.st.rec, token, expected_len)
                rec = t.st.rec.evolve(log_len=len(records))
                st = replace(t.st, rec=rec, log_bytes=len(data), log_gen=t.st.log_gen + 1)
                new = log_path(t.dir, st)
                self._files.write_new(new, data)  # unseen until run.json names it
                self._files.sync_dir(t.dir)
                self._commit(t, st)
                for old in t.dir.glob("log*"):  # the previous log, and any a crash left
                    if old != new:
                        old.unlink(missing_ok=True)
                return rec.log_len

        return await asyncio.to_thread(rewrite)

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        self._count("renew")

        def renew(run_id: str, token: int) -> bool:
            # Extending a live lease only raises it, which the index may lag (run lock
            # only); shortening lowers it, which must reach the index first, and
            # reviving an expired one takes its slot back, which a limited claim may
            # be counting: both take the queue lock too.
            for indexed in (False, True):
                with self._txn(run_id, indexed=indexed) as t:
                    if t is None or not rules.holds_lease(t.st.rec, token):
                        return False
                    expires, old = now + lease_seconds, t.st.rec.lease_expires_at
                    if indexed or (old is not None and now < old <= expires):
                        rec = t.st.rec.evolve(lease_expires_at=expires)
                        self._commit(t, replace(t.st, rec=rec))
                        return True
            raise AssertionError("unreachable")

        def renew_all() -> set[str]:  # one thread hop; each run has its own lock
            return {run_id for run_id, token in leases.items() if renew(run_id, token)}

        return await asyncio.to_thread(renew_all) if leases else set()

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

        def release() -> bool:
            with self._txn(run_id, indexed=True) as t:
                if t is None or not rules.holds_lease(t.st.rec, token):
                    return False
                pending = t.st.last_inbox_id > t.st.rec.inbox_pos
                rec = rules.released(t.st.rec, status=status, due_at=due_at, now=now,
                                     pending=pending)  # fmt: skip
                self._commit(t, replace(t.st, rec=rec))
                return True

        ok = await asyncio.to_thread(release)
        if ok:
            self._hub.publish(run_id)
        return ok

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        self._count("deliver")

        def deliver() -> int:
            with self._txn(run_id, indexed=True) as t:
                if t is None:
                    raise RunNotFound(run_id)
                if t.st.rec.status.is_terminal:
                    raise RunFinished(run_id, t.st.rec.status.value)
                item = t.st.last_inbox_id + 1
                self._files.write_new(t.dir / "inbox" / f"{item:08d}", data)  # unseen until commit
                self._files.sync_dir(t.dir / "inbox")
                rec = t.st.rec.evolve(due_at=now)
                self._commit(t, replace(t.st, rec=rec, last_inbox_id=item))
                return item

        item = await asyncio.to_thread(deliver)
        self._hub.publish(run_id)
        return item

    async def request_cancel(self, run_id: str, *, now: float, revert: bool = False) -> None:
        self._count("request_cancel")

        def cancel() -> bool:
            with self._txn(run_id, indexed=True) as t:
                if t is None:
                    raise RunNotFound(run_id)
                if t.st.rec.status.is_terminal:
                    return False
                rec = replace(
                    t.st.rec,
                    cancel_requested=True,
                    revert_requested=revert or t.st.rec.revert_requested,
                    due_at=now,
                )
                self._commit(t, replace(t.st, rec=rec))
                return True

        if await asyncio.to_thread(cancel):
            self._hub.publish(run_id)

    async def reopen(
        self, run_id: str, *, status: RunStatus, expected_len: int, keep_len: int, now: float
    ) -> bool:
        self._count("reopen")

        def reopen() -> bool:
            with self._txn(run_id, indexed=True) as t:
                if t is None:
                    raise RunNotFound(run_id)
                st = t.st
                if st.rec.status != status or st.rec.log_len != expected_len:
                    return False
                kept = read_log(run_id, t.dir, st, 0)[:keep_len]
                # The bytes past log_bytes are dropped by the next append (append_at).
                size = len(frame(kept))
                rec = rules.reopened(st.rec, keep_len=keep_len, now=now)
                self._commit(t, replace(st, rec=rec, log_bytes=size))
                return True

        if await asyncio.to_thread(reopen):
            self._hub.publish(run_id)
            return True
        return False

    async def get_run(self, run_id: str) -> RunRecord | None:
        self._count("get_run")
        st = await asyncio.to_thread(load_state, self._run_dir(run_id))
        return None if st is None else st.rec

    async def list_runs(self, query: RunQuery = ALL_RUNS) -> list[RunRecord]:
        """Reads every run.json: the file store has no index by time (a bounded
        ``run_ids`` query reads only those runs)."""
        self._count("list_runs")

        def scan() -> list[RunRecord]:
            if query.run_ids is not None:
                dirs: Iterator[Path] = (self._run_dir(rid) for rid in query.run_ids)
            else:
                dirs = self._runs.iterdir()
            states = (load_state(d) for d in dirs)
            return rules.newest_first((st.rec for st in states if st is not None), query)

        return await asyncio.to_thread(scan)

    async def count_runs(self) -> RunCounts:
        """Reads every run.json, like ``list_runs``: the status lives only there (the
        queue indexes hold due runs only), and one pass in a thread is all it costs."""
        self._count("count_runs")

        def scan() -> RunCounts:
            states = (load_state(d) for d in self._runs.iterdir())
            return rules.tally(st.rec for st in states if st is not None)

        return await asyncio.to_thread(scan)

    # -- test helpers -------------------------------------------------------

    async def corrupt(self, run_id: str, position: int, data: bytes) -> None:
        """Overwrite one stored log record (to test how bad data is handled)."""

        def corrupt() -> None:
            with self._txn(run_id, indexed=False) as t:
                if t is None:
                    raise RunNotFound(run_id)
                log = read_log(run_id, t.dir, t.st, 0)
                log[position] = data
                raw = frame(log)
                self._files.replace(log_path(t.dir, t.st), raw)
                self._files.replace(t.dir / "run.json", dump(replace(t.st, log_bytes=len(raw))))

        await asyncio.to_thread(corrupt)
