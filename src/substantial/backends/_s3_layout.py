"""Where the S3 store keeps each thing, and how its objects are encoded.

Keys, under the store's prefix (``<id>`` is percent-quoted, so it never holds a ``/``)::

    format                                  store format version ("1")
    runs/<run>                              the run object: a RunRecord as JSON (its
                                            published state too), plus the log
                                            generation, last inbox id, index time
    logs/<run>/<gen>/<pos:012d>             a log object: the records appended at ``pos``
    inbox/<run>/<id:012d>                   one delivered item
    due/<queue>/<time>/<workflow>/<run>     the due index: empty objects; a listing in key
                                            order is the claim scan, oldest first
    created/<inverted time>/<run>           the creation index: a listing in key order is
                                            newest first, for ``list_runs``
    limits/<queue>.json                     a limited queue's slot holders and recent
                                            starts (``_s3_limits``), replaced with If-Match
    workers/<worker>                        the worker registry

A log object holds a JSON header and its records, each framed by a 4-byte length. Its
header says which lease token wrote it, the run update it carries (applied to the run
object right after, or rolled forward by the next claimer after a crash; the values
the append published, ``RunUpdate.state``, included), and for the
two kinds that hold no records: a *fence* (a claim reserving the log's next position for
its token) and a *seal* (a compaction naming the generation that replaces this one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import orjson

from .._types import RunStatus
from ..errors import CorruptRecord
from ._protocol import RunRecord, RunUpdate

FORMAT = b"1"
_LEN = struct.Struct(">I")
_CREATED_FLIP = 10**11  # created/ keys hold 1e11 - created_at: ascending keys, newest first


def q(part: str) -> str:
    """An id made safe as one key segment."""
    return quote(part, safe="")


def time_key(t: float) -> str:
    """Fixed width, so key order is time order (epoch seconds, microseconds)."""
    return f"{max(t, 0.0):017.6f}"


class Keys:
    """The key of each object of one store (bucket prefix applied)."""

    def __init__(self, prefix: str) -> None:
        self.root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""

    @property
    def format(self) -> str:
        return f"{self.root}format"

    @property
    def runs(self) -> str:
        return f"{self.root}runs/"

    def run(self, run_id: str) -> str:
        return f"{self.root}runs/{q(run_id)}"

    def run_id_of(self, key: str) -> str:
        return unquote(key.rsplit("/", 1)[1])

    def gen(self, run_id: str, gen: str) -> str:
        return f"{self.root}logs/{q(run_id)}/{gen}/"

    def log(self, run_id: str, gen: str, pos: int) -> str:
        return f"{self.root}logs/{q(run_id)}/{gen}/{pos:012d}"

    def logs(self, run_id: str) -> str:
        return f"{self.root}logs/{q(run_id)}/"

    def inbox(self, run_id: str) -> str:
        return f"{self.root}inbox/{q(run_id)}/"

    def item(self, run_id: str, item_id: int) -> str:
        return f"{self.root}inbox/{q(run_id)}/{item_id:012d}"

    def queue(self, queue: str) -> str:
        return f"{self.root}due/{q(queue)}/"

    def due(self, rec: RunRecord, at: str) -> str:
        return f"{self.root}due/{q(rec.queue)}/{at}/{q(rec.workflow)}/{q(rec.run_id)}"

    @property
    def created_all(self) -> str:
        return f"{self.root}created/"

    def created(self, run_id: str, created_at: float) -> str:
        return f"{self.root}created/{created_stamp(created_at)}/{q(run_id)}"

    def limits(self, queue: str) -> str:
        return f"{self.root}limits/{q(queue)}.json"

    @property
    def workers(self) -> str:
        return f"{self.root}workers/"

    def worker(self, worker_id: str) -> str:
        return f"{self.root}workers/{q(worker_id)}"


@dataclass(frozen=True, slots=True)
class DueEntry:
    """One due-index key, parsed: the run is worth a look from ``at`` on."""

    key: str
    stamp: str  # the time as written in the key (``time_key``)
    at: float
    workflow: str
    run_id: str


def parse_due(key: str) -> DueEntry | None:
    parts = key.rsplit("/", 3)
    if len(parts) != 4:
        return None
    try:
        at = float(parts[1])
    except ValueError:
        return None
    return DueEntry(
        key=key, stamp=parts[1], at=at, workflow=unquote(parts[2]), run_id=unquote(parts[3])
    )


def created_stamp(created_at: float) -> str:
    return time_key(_CREATED_FLIP - created_at)


def parse_created(key: str) -> tuple[float, str, str] | None:
    """``(created_at, run_id, stamp)`` of a creation-index key (``created_at`` to the
    microsecond; ``stamp`` as written, to match against a run object's own)."""
    parts = key.rsplit("/", 2)
    try:
        return _CREATED_FLIP - float(parts[1]), unquote(parts[2]), parts[1]
    except (IndexError, ValueError):
        return None


def wake_at(rec: RunRecord) -> float | None:
    """When the run can next be claimed (its index time): its due time, or its lease's
    expiry if that is later. None: no claim will ever take it without a new change."""
    if rec.due_at is None or rec.status.is_terminal:
        return None
    if rec.lease_owner is not None and rec.lease_expires_at is not None:
        return max(rec.due_at, rec.lease_expires_at)
    return rec.due_at


# -- the run object -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunDoc:
    """A run object as read: the record, what only this store keeps, and its ETag."""

    rec: RunRecord
    gen: str  # the log generation the log starts in (a seal may lead further)
    last_inbox_id: int
    indexed: str | None  # time_key of its due-index entry, if it has one
    nonce: str  # who wrote this version (a retried write recognises its own)
    etag: str = ""


def dump_run(doc: RunDoc) -> bytes:
    r = doc.rec
    return orjson.dumps(
        {
            "run_id": r.run_id,
            "workflow": r.workflow,
            "queue": r.queue,
            "status": r.status.value,
            "created_at": r.created_at,
            "started_at": r.started_at,
            "ended_at": r.ended_at,
            "due_at": r.due_at,
            "result": r.result,
            "error": r.error,
            "error_type": r.error_type,
            "log_len": r.log_len,
            "inbox_pos": r.inbox_pos,
            "lease_token": r.lease_token,
            "lease_owner": r.lease_owner,
            "lease_expires_at": r.lease_expires_at,
            "cancel_requested": r.cancel_requested,
            "parent_id": r.parent_id,
            "revert_requested": r.revert_requested,
            "priority": r.priority,
            "concurrency_key": r.concurrency_key,
            "state": None if r.state is None else dict(r.state),  # orjson takes dicts only
            "gen": doc.gen,
            "last_inbox_id": doc.last_inbox_id,
            "indexed": doc.indexed,
            "w": doc.nonce,
        }
    )


def load_run(raw: bytes, etag: str) -> RunDoc:
    """A run object; one written before ``priority``, ``concurrency_key`` and
    ``state`` existed reads as 0, None and None (RunRecord's defaults: a ``state`` of
    None says the store holds no index of what that run published, so a search reads
    its log instead of missing it)."""
    d: dict[str, Any] = orjson.loads(raw)
    gen, last, indexed, nonce = d.pop("gen"), d.pop("last_inbox_id"), d.pop("indexed"), d.pop("w")
    d["status"] = RunStatus(d["status"])
    return RunDoc(
        rec=RunRecord(**d), gen=gen, last_inbox_id=last, indexed=indexed, nonce=nonce, etag=etag
    )


# -- a limited queue's coordination object ----------------------------------------


@dataclass(frozen=True, slots=True)
class Slot:
    """A run a limited claim reserved a slot for: its concurrency key, the lease token
    of that claim and when the lease it took ends (``until``)."""

    key: str | None
    token: int
    until: float


@dataclass(frozen=True, slots=True)
class LimitDoc:
    """``limits/<queue>.json`` as read: the slot holders by run id, the queue's recent
    first-claim times, and the ETag a replacement is conditional on (None: no object
    yet, a replacement is created with If-None-Match)."""

    holders: dict[str, Slot]
    starts: list[float]
    nonce: str = ""
    etag: str | None = None


def dump_limits(holders: dict[str, Slot], starts: list[float], nonce: str) -> bytes:
    return orjson.dumps(
        {
            "holders": {rid: [s.key, s.token, s.until] for rid, s in holders.items()},
            "starts": starts,
            "w": nonce,
        }
    )


def load_limits(raw: bytes, etag: str) -> LimitDoc:
    d: dict[str, Any] = orjson.loads(raw)
    holders = {rid: Slot(h[0], int(h[1]), float(h[2])) for rid, h in d["holders"].items()}
    return LimitDoc(holders, [float(s) for s in d["starts"]], str(d.get("w", "")), etag)


# -- log objects ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogObject:
    """A log object as read: its records and what its header says."""

    pos: int
    records: list[bytes]
    token: int
    update: RunUpdate | None = None
    fence: bool = False  # a claim's reservation of this position (no records)
    seal: str | None = None  # the generation that replaces this one (no records)
    nonce: str = ""
    etag: str = ""

    @property
    def end(self) -> int:
        return self.pos + len(self.records)


def _update_doc(u: RunUpdate) -> dict[str, Any]:
    d: dict[str, Any] = {"release": u.release, "due_at": u.due_at}
    if u.status is not None:
        d["status"] = u.status.value
    if u.has_result:
        d["result"] = u.result
    for name in ("error", "error_type", "ended_at", "inbox_pos"):
        value = getattr(u, name)
        if value is not None:
            d[name] = value
    if u.state:  # so a claimer rolling a dead writer's append forward merges it too
        d["state"] = dict(u.state)
    return d


def _update_of(d: dict[str, Any]) -> RunUpdate:
    d = dict(d)
    if "status" in d:
        d["status"] = RunStatus(d["status"])
    return RunUpdate(**d)


def dump_log(
    *,
    token: int,
    nonce: str,
    records: list[bytes] | tuple[bytes, ...] = (),
    update: RunUpdate | None = None,
    fence: bool = False,
    seal: str | None = None,
) -> bytes:
    head: dict[str, Any] = {"t": token, "n": len(records), "w": nonce}
    if update is not None:
        head["u"] = _update_doc(update)
    if fence:
        head["fence"] = True
    if seal is not None:
        head["seal"] = seal
    h = orjson.dumps(head)
    parts = [_LEN.pack(len(h)), h]
    for r in records:
        parts.append(_LEN.pack(len(r)))
        parts.append(r)
    return b"".join(parts)


def load_log(run_id: str, pos: int, raw: bytes, etag: str) -> LogObject:
    """Parse a log object; a torn or foreign one is a CorruptRecord naming its position."""
    try:
        (hl,) = _LEN.unpack_from(raw, 0)
        head = orjson.loads(raw[4 : 4 + hl])
        at = 4 + hl
        records = []
        for _ in range(int(head["n"])):
            (n,) = _LEN.unpack_from(raw, at)
            if at + 4 + n > len(raw):
                raise ValueError("record past the object's end")
            records.append(raw[at + 4 : at + 4 + n])
            at += 4 + n
        return LogObject(
            pos=pos,
            records=records,
            token=int(head["t"]),
            update=_update_of(head["u"]) if "u" in head else None,
            fence=bool(head.get("fence")),
            seal=head.get("seal"),
            nonce=str(head.get("w", "")),
            etag=etag,
        )
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptRecord(run_id, pos, f"unreadable log object: {exc}") from None


def log_pos(key: str) -> int:
    return int(key.rsplit("/", 1)[1])
