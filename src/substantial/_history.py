"""A run's timeline: its decoded log records in, one entry per durable call out.

Pure over records (no store, no clock), so the CLI's ``show``, the HTTP API's
``/history`` and the dashboard draw the same thing, and old logs draw too:
records written before the history fields existed (``t0``, ``ms``, ``step``,
an event's ``t``; see ``_records``) give entries without times or names.

A page can also be built from the log read forward a slice at a time
(:class:`PageScan`), so a page of a long run costs about the records it shows;
its cursor says where in the log the next page starts. Both ways give the same
entries and the same cursors.

Entries come in log order, which is call order: a call sits where its first
record is (a save's first attempt, a wait's arm), an event where the run took
it in, a compaction where its mark is, and the end last. Kinds are the
public names of the primitives (DESIGN.md section 6, "Shapes"):

=============  ======================================================
kind           from
=============  ======================================================
save           ``save``; ``attempts`` = failed tries + the final one
revert         one compensation run by ``revert()`` (a save of its own)
sleep          ``sleep`` / ``sleep_until``; ``value`` = ``{"due": ISO}``
receive        ``receive`` (and a child's ``result()``); ``value`` = payload
ensure         ``ensure``
now, random,   the recorded value
uuid4
log            a log line: ``name`` = level, ``value`` = ``{"message", "fields"}``
child          ``start_child``: ``name`` = workflow, ``value`` = the child's id
continue       ``continue_using``: ``name`` = workflow, ``value`` = the new run's id
compact        a compaction's mark: ``value`` = ``{"next", "n", "from"}``
patch          ``patched()`` took the patch: ``name`` = the patch id
publish        ``publish()``: ``name`` = the key, ``value`` = the value
event          an event: ``seq``/``at`` = the receive that consumed it (else None)
end            ``name`` = the final status; ``value`` = the result, or for a failed
               run ``{"error_type", "traceback"}``
=============  ======================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from . import _records as R
from ._types import RunSummary
from .errors import ClientError

__all__ = [
    "KINDS",
    "History",
    "HistoryEntry",
    "PageScan",
    "history_page",
    "page",
    "parse_cursor",
    "timeline",
]

KINDS: Final = frozenset(
    {"save", "sleep", "receive", "ensure", "now", "random", "uuid4", "log", "child"}
    | {"revert", "continue", "compact", "patch", "publish", "event", "end"}
)
_KIND_OF: Final = {"start_child": "child", "continue_using": "continue", "compensate": "revert"}


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryEntry:
    """One line of the timeline (see the module docstring for each kind).

    ``error`` is the last error's message (for a save that succeeded on a
    retry, the last failed attempt's); ``failed`` says whether the call ended
    in it. ``error_type``, ``failed`` and ``traceback`` (the end of a failed
    run) are for display: the JSON shape keeps to the contract's keys."""

    seq: int | None
    kind: str
    name: str | None = None
    at: str | None = None
    started_at: datetime | None = None
    duration_ms: float | None = None
    attempts: int | None = None
    error: str | None = None
    value: Any = None
    error_type: str | None = None
    failed: bool = False
    traceback: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class History:
    """One page of a run's timeline; ``next_cursor`` continues it (None: the last)."""

    run_id: str
    entries: list[HistoryEntry] = field(default_factory=list)
    next_cursor: str | None = None
    summary: RunSummary | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunDetails:
    """What an operator's run page shows besides the timeline."""

    summary: RunSummary
    kwargs: dict[str, Any]
    children: list[str]  # run ids, in the order the run started them


def run_details(summary: RunSummary, records: Sequence[R.Record]) -> RunDetails:
    """The run's start kwargs and its children's ids, read from its log (the start
    record holds ``kw``; each ``start_child`` call's record holds the child's id).
    A child started under a ``key`` in a loop the run compacted keeps only its last
    call's record, so such a run lists only its latest child of that key."""
    kwargs: dict[str, Any] = {}
    children: list[str] = []
    for rec in records:
        if rec["k"] == R.START and isinstance(rec.get("kw"), dict):
            kwargs = rec["kw"]
        elif rec["k"] == R.CALL and rec.get("p") == "start_child" and isinstance(rec.get("v"), str):
            children.append(rec["v"])
    return RunDetails(summary=summary, kwargs=kwargs, children=children)


def _time(t: Any) -> datetime | None:
    return datetime.fromtimestamp(t, UTC) if isinstance(t, int | float) else None


def _ms(t0: Any, t1: Any) -> float | None:
    if isinstance(t0, int | float) and isinstance(t1, int | float):
        return round(max(0.0, t1 - t0) * 1000.0, 3)
    return None


def timeline(records: Sequence[R.Record], *, run: str) -> list[HistoryEntry]:
    """The entries of run ``run``'s log ``records`` (decoded, in log order)."""
    return _Index(records).entries(0, None)


def history_page(
    records: Sequence[R.Record], *, run: str, limit: int | None, cursor: str | None
) -> tuple[list[HistoryEntry], str | None]:
    """One page of ``timeline(records)`` (see :func:`page`), building only the
    entries on it: a page of a 10,000-record log costs an index, not 10,000
    entries. The cursor is the one :class:`PageScan` gives for the same page."""
    index = _Index(records)
    start, end, _ = _bounds(index.size, limit, cursor)
    return index.entries(start, end), index.cursor(end) if end < index.size else None


class _Records(Protocol):
    """Records by log position: the whole log, or the part of it a scan has read."""

    def __len__(self) -> int: ...

    def __getitem__(self, pos: int, /) -> R.Record: ...


class _Index:
    """Where each entry of a log starts, and what it needs to be built."""

    def __init__(self, records: Sequence[R.Record]) -> None:
        self.records = records
        self.calls: dict[int, list[R.Record]] = {}
        self.order: list[tuple[int | None, int]] = []  # (seq of a call | None, position)
        self.consumer: dict[int, R.Record] = {}  # event position -> the receive that took it
        self.final_at: dict[int, int] = {}  # seq -> position of its (first) final record
        for pos, rec in enumerate(records):
            k = rec.get("k")
            seq = rec.get("s")
            if k in _CALL_KINDS and isinstance(seq, int):
                recs = self.calls.get(seq)
                if recs is None:
                    self.calls[seq] = [rec]
                    self.order.append((seq, pos))
                else:
                    recs.append(rec)
                if seq not in self.final_at and R.is_final(rec):
                    self.final_at[seq] = pos
                if k == R.CALL and isinstance(rec.get("ev"), int):
                    self.consumer[rec["ev"]] = rec
            elif k in _OTHER_KINDS:
                self.order.append((None, pos))
        self.size = len(self.order)

    def entries(self, start: int, end: int | None) -> list[HistoryEntry]:
        out = []
        for seq, pos in self.order[start:end]:
            if seq is not None:
                out.append(_call(seq, self.calls[seq], self.records))
            else:
                out.append(_other(self.records[pos], self.consumer.get(pos)))
        return out

    def cursor(self, end: int) -> str:
        """The cursor of the page starting at entry ``end`` (< ``size``)."""
        at = self.order[end][1]
        begun = {seq for seq, _ in self.order[:end] if seq is not None}
        return _cursor(end, at, begun, self.final_at)


def _cursor(index: int, at: int, begun: set[int], final_at: dict[int, int]) -> str:
    """``h<index>.<at>[.<seq>...]``: the page starts with entry ``index``, whose first
    record is at log position ``at``; the seqs are the calls begun before ``at``
    whose final record is not before it (their records from ``at`` on are theirs,
    not new entries)."""
    still = sorted(s for s in begun if final_at.get(s, at) >= at)
    return "h" + ".".join(str(n) for n in (index, at, *still))


def parse_cursor(cursor: str | None) -> tuple[int, int | None, frozenset[int]]:
    """A history cursor's entry index, log position (None for ``h<index>``, a
    cursor without one) and calls still open; ClientError if it is none."""
    if cursor is None:
        return 0, 0, frozenset()
    parts = cursor[1:].split(".")
    if not cursor.startswith("h") or not all(p.isascii() and p.isdigit() for p in parts):
        raise ClientError(f"{cursor!r} is not a history cursor")
    numbers = [int(p) for p in parts]
    return numbers[0], numbers[1] if len(numbers) > 1 else None, frozenset(numbers[2:])


class PageScan:
    """One page of the timeline, built from the log read forward from where the
    page starts (``feed`` one record after the other), not from the whole log.

    The page is done once it holds ``limit`` entries, the first record of the entry
    after them is found (where the next page starts) and each of its entries has
    what it is drawn from: a call its final record, an event the receive that took
    it. Until then the scan reads on, to the log's end at worst (a sleep still
    armed, an event no receive took yet). A receive's value is the event it names,
    which may lie before the page: ``missing`` lists those positions, ``recall``
    adds them. The entries and cursors are those of :func:`history_page`."""

    def __init__(self, *, limit: int, cursor: str | None) -> None:
        if limit < 1:
            raise ClientError(f"limit must be at least 1, got {limit}")
        index, at, still = parse_cursor(cursor)
        if at is None:
            raise ValueError("a cursor without a log position: page the whole timeline")
        self.limit, self.index, self.end = limit, index, at  # end: the next position to read
        self._open = set(still)  # calls of earlier pages that may have records from here
        self._known: dict[int, R.Record] = {}
        self._calls: dict[int, list[R.Record]] = {}
        self._order: list[tuple[int | None, int]] = []
        self._consumer: dict[int, R.Record] = {}
        self._final_at: dict[int, int] = {}
        self._unfinished: set[int] = set()  # calls of this page without a final record yet
        self._untaken: set[int] = set()  # events of this page no receive took yet
        self._next_at: int | None = None

    @property
    def done(self) -> bool:
        return self._next_at is not None and not self._unfinished and not self._untaken

    def feed(self, rec: R.Record) -> None:
        """The record at position ``end`` (decoded)."""
        pos, self.end = self.end, self.end + 1
        self._known[pos] = rec
        k, seq = rec.get("k"), rec.get("s")
        if k == R.CALL and isinstance(rec.get("ev"), int):
            self._consumer[rec["ev"]] = rec
            self._untaken.discard(rec["ev"])
        if k in _CALL_KINDS and isinstance(seq, int):
            if seq in self._open or seq in self._calls:
                if seq in self._calls:
                    self._calls[seq].append(rec)
                if seq not in self._final_at and R.is_final(rec):
                    self._final_at[seq] = pos
                    self._unfinished.discard(seq)
            elif self._starts(pos):
                self._calls[seq] = [rec]
                self._order.append((seq, pos))
                if R.is_final(rec):
                    self._final_at[seq] = pos
                else:
                    self._unfinished.add(seq)
        elif k in _OTHER_KINDS and self._starts(pos):
            self._order.append((None, pos))
            if k == R.EVENT:
                self._untaken.add(pos)

    def _starts(self, pos: int) -> bool:
        """Whether the entry whose first record is at ``pos`` is on this page; if not,
        the next page starts there."""
        if len(self._order) < self.limit:
            return True
        if self._next_at is None:
            self._next_at = pos
        return False

    def missing(self) -> list[int]:
        """Positions before the scanned ones that the page's receives name."""
        named = {r.get("ev") for recs in self._calls.values() for r in recs}
        return sorted(p for p in named if isinstance(p, int) and p >= 0 and p not in self._known)

    def recall(self, pos: int, rec: R.Record) -> None:
        self._known[pos] = rec

    def page(self) -> tuple[list[HistoryEntry], str | None]:
        """The entries, and the next page's cursor (None: the log ends with them)."""
        view = _Seen(self._known, self.end)
        out = []
        for seq, pos in self._order:
            if seq is not None:
                out.append(_call(seq, self._calls[seq], view))
            else:
                out.append(_other(self._known[pos], self._consumer.get(pos)))
        if self._next_at is None:
            return out, None
        begun = self._open | set(self._calls)
        return out, _cursor(self.index + len(out), self._next_at, begun, self._final_at)


class _Seen:
    """The records a scan has read (and recalled), by position; ``{}`` for one it
    could not recall (a log cut by a resume between two reads)."""

    def __init__(self, known: dict[int, R.Record], size: int) -> None:
        self._known, self._size = known, size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, pos: int, /) -> R.Record:
        return self._known.get(pos, {})


_CALL_KINDS: Final = frozenset({R.CALL, R.TRY, R.ARM, R.LOG})
_OTHER_KINDS: Final = frozenset({R.EVENT, R.MARK, R.END, R.STATE})


def _call(seq: int, recs: list[R.Record], records: _Records) -> HistoryEntry:
    first = recs[0]
    p = str(first.get("p", "?"))
    kind = _KIND_OF.get(p, p)
    final = next((r for r in recs if R.is_final(r)), None)
    base: dict[str, Any] = {"seq": seq, "kind": kind, "at": first.get("at")}
    if kind in ("save", "revert"):
        return _save(base, recs, final)
    if kind in ("sleep", "receive", "ensure"):
        return _wait(base, recs, final, records)
    if kind == "log":
        return HistoryEntry(
            **base,
            name=first.get("level"),
            started_at=_time(first.get("t")),
            value={"message": first.get("msg"), "fields": first.get("fields") or {}},
        )
    started = _time(first.get("t0"))
    value = None if final is None else final.get("v")
    return HistoryEntry(**base, name=first.get("name"), started_at=started, value=value)


def _save(base: dict[str, Any], recs: list[R.Record], final: R.Record | None) -> HistoryEntry:
    tries = [r for r in recs if r.get("k") == R.TRY]
    attempts = [*tries, final] if final is not None else tries
    name = next((r["step"] for r in attempts if isinstance(r.get("step"), str)), None)
    last = attempts[-1] if attempts else {}
    t0, t1 = attempts[0].get("t0") if attempts else None, None
    if isinstance(last.get("t0"), int | float) and isinstance(last.get("ms"), int | float):
        t1 = last["t0"] + last["ms"] / 1000.0
    errors = [r["err"] for r in attempts if isinstance(r.get("err"), dict)]
    err = errors[-1] if errors else None
    return HistoryEntry(
        **base,
        name=name,
        started_at=_time(t0),
        duration_ms=_ms(t0, t1),
        attempts=len(attempts),
        error=None if err is None else str(err.get("msg")),
        error_type=None if err is None else err.get("type"),
        failed=final is not None and "err" in final,
        value=final.get("v") if final is not None and "err" not in final else None,
    )


def _wait(
    base: dict[str, Any],
    recs: list[R.Record],
    final: R.Record | None,
    records: _Records,
) -> HistoryEntry:
    first = recs[0]
    t0 = first.get("t0")
    if base["kind"] == "sleep":
        due = first.get("due")
        when = _time(due)
        timer = {"due": None if when is None else when.isoformat()}
        return HistoryEntry(**base, started_at=_time(t0), duration_ms=_ms(t0, due), value=timer)
    end = None if final is None else final.get("t0")
    timed_out = final is not None and bool(final.get("to"))
    value: Any = None
    if final is not None and not timed_out:
        ev = final.get("ev")
        if base["kind"] == "ensure":
            value = True
        elif isinstance(ev, int) and 0 <= ev < len(records):
            value = records[ev].get("v")
    return HistoryEntry(
        **base,
        name=first.get("name"),
        started_at=_time(t0),
        duration_ms=_ms(t0, end),
        error="timed out" if timed_out else None,
        error_type="TimeoutError" if timed_out else None,
        failed=timed_out,
        value=value,
    )


def _other(rec: R.Record, taken_by: R.Record | None) -> HistoryEntry:
    k = rec.get("k")
    if k == R.EVENT:
        return HistoryEntry(
            seq=None if taken_by is None else taken_by.get("s"),
            kind="event",
            name=rec.get("name"),
            at=None if taken_by is None else taken_by.get("at"),
            started_at=_time(rec.get("t")),
            value=rec.get("v"),
        )
    if k == R.MARK:
        value = {"next": rec.get("next"), "n": rec.get("n"), "from": rec.get("from")}
        return HistoryEntry(seq=None, kind="compact", value=value)
    if k == R.STATE:
        return HistoryEntry(
            seq=None,
            kind="publish",
            name=rec.get("name"),
            started_at=_time(rec.get("t")),
            value=rec.get("v"),
        )
    err = rec.get("err")
    if isinstance(err, dict):
        tb = err.get("tb")
        return HistoryEntry(
            seq=None,
            kind="end",
            name=rec.get("status"),
            error=None if err.get("msg") is None else str(err.get("msg")),
            error_type=err.get("type"),
            failed=True,
            traceback=tb,
            value={"error_type": err.get("type"), "traceback": tb},
        )
    return HistoryEntry(seq=None, kind="end", name=rec.get("status"), value=rec.get("v"))


def page(
    entries: list[HistoryEntry], *, limit: int | None, cursor: str | None
) -> tuple[list[HistoryEntry], str | None]:
    """Entries from ``cursor`` (opaque: the position after the previous page), at
    most ``limit``; and the cursor of the next page (None: this is the last)."""
    start, end, next_cursor = _bounds(len(entries), limit, cursor)
    return entries[start:end], next_cursor


def _bounds(size: int, limit: int | None, cursor: str | None) -> tuple[int, int, str | None]:
    if limit is not None and limit < 1:
        raise ClientError(f"limit must be at least 1, got {limit}")
    start = parse_cursor(cursor)[0]
    end = size if limit is None else min(size, start + limit)
    return start, end, (f"h{end}" if end < size else None)
