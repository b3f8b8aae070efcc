"""The file store's on-disk formats: names, ``run.json``, log framing, index entries,
locks and atomic writes. The layout and why it is safe are described in ``fs.py``."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from .._types import RunStatus
from ..errors import CorruptRecord
from ._protocol import RunRecord

FORMAT = 1
FRAME = struct.Struct(">I")
_FIELDS = tuple(f.name for f in fields(RunRecord))
_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")

# [due_at, lease_expires_at, workflow, created_at, started, priority, concurrency_key],
# the tail (what a limited claim picks by) cut after its last non-default field,
# so an index of plain runs is what it always was. See ``entry``.
Entry = list[Any]


def file_name(key: str) -> str:
    """A file name for a user-chosen id that can never leave its directory.

    Plain ids are kept readable; anything else (separators, "..", a leading dot,
    non-ASCII, very long) becomes "~" + sha256, which no plain id can start with.
    The real id is stored inside ``run.json``.
    """
    if _SAFE.fullmatch(key):
        return key
    return "~" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@contextmanager
def flock(path: Path) -> Iterator[None]:
    """Exclusive flock; each call opens its own descriptor, so threads exclude too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


@dataclass(frozen=True, slots=True)
class State:
    """Everything in run.json."""

    rec: RunRecord
    last_inbox_id: int = 0
    log_bytes: int = 0
    log_gen: int = 0  # rewrite_log count, which names the log file (see log_path)


@dataclass(frozen=True, slots=True)
class Txn:
    """A run locked for writing (and its queue, when ``qdir`` is set)."""

    dir: Path
    st: State
    qdir: Path | None


def dump(st: State) -> bytes:
    doc = {k: getattr(st.rec, k) for k in _FIELDS}
    # Absent unless set, so older versions (whose RunRecord lacks them) read the
    # run; a missing field reads as its default (see ``parse``).
    if not st.rec.revert_requested:
        del doc["revert_requested"]
    if not st.rec.priority:
        del doc["priority"]
    if st.rec.concurrency_key is None:
        del doc["concurrency_key"]
    if st.rec.state is None:  # a run from before the store kept its published state
        del doc["state"]
    doc["last_inbox_id"] = st.last_inbox_id
    doc["log_bytes"] = st.log_bytes
    if st.log_gen:  # absent until a rewrite, so older versions still read other runs
        doc["log_gen"] = st.log_gen
    return orjson.dumps(doc)


def parse(raw: bytes) -> State:
    """A run.json; fields added since it was written read as their defaults."""
    doc = orjson.loads(raw)
    last, nbytes, gen = doc.pop("last_inbox_id"), doc.pop("log_bytes"), doc.pop("log_gen", 0)
    doc["status"] = RunStatus(doc["status"])
    return State(RunRecord(**doc), last, nbytes, gen)


def log_path(d: Path, st: State) -> Path:
    """The run's log file: ``log``, then ``log.<gen>`` after each rewrite_log."""
    return d / (f"log.{st.log_gen}" if st.log_gen else "log")


def frame(records: Sequence[bytes]) -> bytes:
    return b"".join(FRAME.pack(len(r)) + r for r in records)


def unframe(run_id: str, buf: bytes, st: State, log_from: int) -> list[bytes]:
    """The records of a committed log from ``log_from``; CorruptRecord if it does not
    hold exactly what run.json says."""
    out: list[bytes] = []
    off = pos = 0
    while off < len(buf):
        if off + FRAME.size > len(buf):
            raise CorruptRecord(run_id, pos, "truncated length prefix")
        (n,) = FRAME.unpack_from(buf, off)
        off += FRAME.size
        if off + n > len(buf):
            raise CorruptRecord(run_id, pos, "truncated record")
        if pos >= log_from:
            out.append(buf[off : off + n])
        off += n
        pos += 1
    if len(buf) != st.log_bytes or pos != st.rec.log_len:
        raise CorruptRecord(run_id, pos, f"log holds {pos} of {st.rec.log_len} records")
    return out


def pack(
    due_at: float,
    lease: float | None,
    workflow: str,
    created_at: float,
    started: bool,
    priority: int,
    key: str | None,
) -> Entry:
    """An index entry; the tail only as long as its last non-default field."""
    e: Entry = [due_at, lease, workflow, created_at]
    if key is not None:
        e += [int(started), priority, key]
    elif priority:
        e += [int(started), priority]
    elif started:
        e.append(1)
    return e


def started(e: Entry) -> bool:
    """Whether the entry says the run started (it may lag a crashed claim: a
    limited claim re-reads run.json before it admits a run)."""
    return len(e) > 4 and bool(e[4])


def priority(e: Entry) -> int:
    return int(e[5]) if len(e) > 5 else 0


def slot_key(e: Entry) -> str | None:
    """The run's concurrency key (its slot group)."""
    return e[6] if len(e) > 6 else None


def entry(rec: RunRecord) -> Entry | None:
    """The run's due-index entry (None: not indexed)."""
    if rec.due_at is None or rec.status.is_terminal:
        return None
    return pack(
        rec.due_at,
        rec.lease_expires_at,
        rec.workflow,
        rec.created_at,
        rec.started_at is not None,
        rec.priority,
        rec.concurrency_key,
    )


def eager(a: Entry | None, b: Entry | None) -> Entry | None:
    """The entry that is claimable whenever ``a`` or ``b`` is (lease None = free),
    and started if either is (a limited claim may skip an unstarted one unread)."""
    if a is None or b is None:
        return b if a is None else a
    lease = None if a[1] is None or b[1] is None else min(a[1], b[1])
    on = started(a) or started(b)
    return pack(min(a[0], b[0]), lease, b[2], b[3], on, priority(b), slot_key(b))


class Writer:
    """Atomic file writes, with or without fsync (``fsync=False`` survives process
    crashes only; ``True`` also power cuts)."""

    def __init__(self, fsync: bool) -> None:
        self.fsync = fsync

    def sync_dir(self, path: Path) -> None:
        if self.fsync:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write_new(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())

    def replace(self, path: Path, data: bytes) -> None:
        """Replace ``path`` atomically (callers hold the lock guarding it)."""
        tmp = path.with_name(path.name + ".tmp")
        self.write_new(tmp, data)
        os.replace(tmp, path)
        self.sync_dir(path.parent)

    def append_at(self, path: Path, committed: int, data: bytes) -> None:
        """Write ``data`` after the first ``committed`` bytes, cutting any torn tail."""
        with open(path, "r+b") as f:
            if os.fstat(f.fileno()).st_size != committed:
                f.truncate(committed)  # a torn append left bytes past the commit
            f.seek(committed)
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())


def load_state(d: Path) -> State | None:
    """A run directory's ``run.json``, or None when it is not there (yet)."""
    try:
        return parse((d / "run.json").read_bytes())
    except FileNotFoundError:
        return None


def read_index(qdir: Path) -> dict[str, Entry]:
    """A queue's ``index.json`` (empty when the queue has none yet)."""
    try:
        idx: dict[str, Entry] = orjson.loads((qdir / "index.json").read_bytes())
    except FileNotFoundError:
        return {}
    return idx


def read_log(run_id: str, d: Path, st: State, log_from: int) -> list[bytes]:
    """The committed records of the run in ``d`` from ``log_from`` (negative: from
    the end), as of ``st``."""
    if log_from < 0:
        log_from = max(0, st.rec.log_len + log_from)
    with open(log_path(d, st), "rb") as f:
        buf = f.read(st.log_bytes)
    return unframe(run_id, buf, st, log_from)
