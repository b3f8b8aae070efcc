"""The replay index: which records answer each durable call, and which events
the workflow can see.

A plain log is matched by sequence id: call number ``s`` gets the records
with ``s``. A compacted log (one that holds a ``mark`` record, see
``_compaction``) lost the records of keys that later calls overwrote, so the
calls before its mark are matched differently; the rule, pure over records:

1. Before the mark, a **keyed** call returns the kept record of its key (the
   value the key had when the run compacted); an **unkeyed** call takes the
   next unkeyed record before the mark, in order, if it is the same call.
2. The ``n``-th ``compact()`` call (``n`` is in the mark: the compactions the
   run had made) is the compaction point: the sequence counter is **rebased**
   onto the mark's ``next``, and calls match by sequence id again. Every
   unkeyed record before the mark must have been matched by then.
3. A call that rule 1 cannot answer before that point (a key with no kept
   record, an unkeyed call that is not the next recorded one, or none left),
   or the workflow returning, means the replay left the loop sooner: the
   loop's kept state already says it is over. The counter is rebased onto the
   mark and the call matches by sequence id; an unkeyed call (or the return)
   first steps over the keyed calls recorded right after the mark (the rest of
   the round the live run made after compacting). Unkeyed records of the compacted stretch (from the
   first keyed call on, ``from`` in the mark) that the replay skipped stay
   unread; an unmatched one before the stretch is a divergence.

Anything else that differs from the log is a :class:`NonDeterminismError`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from . import _records as R
from ._interrupts import CancelRun
from .errors import NonDeterminismError


def describe(
    p: str, name: str | None, at: str | None, key: str | None = None, step: str | None = None
) -> str:
    """``receive('go') at app.py:12``, ``save(step='charge', key='k') at app.py:9``."""
    args = [repr(name)] if name is not None else []
    if step is not None and step != at:
        args.append(f"step={step!r}")
    if key is not None:
        args.append(f"key={key!r}")
    call = f"{p}({', '.join(args)})"
    return f"{call} at {at}" if at else call


def _same(rec: R.Record, p: str, name: str | None, key: str | None) -> bool:
    return rec.get("p") == p and rec.get("name") == name and rec.get("key") == key


def patch_key(patch_id: str) -> str:
    """The key of a patch marker: compaction keeps one per patch, however many
    rounds of a loop record it."""
    return f"patch:{patch_id}"


def _is_marker(rec: R.Record, patch_id: str) -> bool:
    return rec.get("p") == "patch" and rec.get("name") == patch_id


def describe_record(rec: R.Record) -> str:
    step = rec.get("step")
    return describe(
        rec.get("p", "?"),
        rec.get("name"),
        rec.get("at"),
        rec.get("key"),
        step if isinstance(step, str) else None,
    )


@dataclass(frozen=True, slots=True)
class Step:
    """One durable call as the log answers it."""

    seq: int
    records: list[R.Record]  # its records in the log; empty at the live edge
    done: bool  # the log holds later calls: this one completed


@dataclass(slots=True)
class _Mark:
    pos: int
    next: int  # the sequence id the run had reached at the compaction
    n: int  # compact() calls made up to it
    first: int  # sequence id of the first keyed call: the compacted stretch starts there
    keyed: dict[str, int]  # key -> the sequence id of its kept call
    unkeyed: list[int]  # sequence ids of the unkeyed calls before the mark, in order


class Replay:
    """The replay index and event cursor of one run's log (see module docstring).

    ``on_visible(record)`` is called for each event as it becomes visible, in
    log order (handlers are fed from it)."""

    def __init__(
        self, run_id: str, records: list[R.Record], on_visible: Callable[[R.Record], None]
    ) -> None:
        self.run_id = run_id
        self._on_visible = on_visible
        self.next_seq = 0
        self.compacts = 0  # compact() calls made so far
        self.consumed: dict[str, int] = {}  # event name -> how many were received
        self._mark: _Mark | None = None
        self._matched = 0  # unkeyed records before the mark matched so far
        self._rebased = False
        self.stop_at: int | None = None  # see begin()
        self.reload(records, cursor=1, live=False)

    def reload(self, records: list[R.Record], *, cursor: int, live: bool) -> None:
        """Index ``records`` from scratch. ``live``: the log was just compacted at
        the live edge, so its mark is behind us (the counters carry over)."""
        self.records = records
        self.calls: dict[int, list[int]] = {}  # seq -> positions of its records
        self.max_seq = -1
        self.event_pos: list[int] = []
        self.by_name: dict[str, list[int]] = {}
        self.cursor = cursor  # events at positions < cursor are visible
        self._indexed = 0
        self._mark = None
        self.index_new()
        if live and self._mark is not None:
            self._matched = len(self._mark.unkeyed)
            self._rebased = True

    def index_new(self) -> None:
        """Index records appended since the last call."""
        records = self.records
        for pos in range(self._indexed, len(records)):
            rec = records[pos]
            k = rec.get("k")
            if k == R.EVENT:
                self.event_pos.append(pos)
                self.by_name.setdefault(rec["name"], []).append(pos)
            elif k == R.MARK:
                self._set_mark(pos, rec)
            elif "s" in rec:
                self.calls.setdefault(rec["s"], []).append(pos)
                self.max_seq = max(self.max_seq, rec["s"])
        self._indexed = len(records)

    def _set_mark(self, pos: int, rec: R.Record) -> None:
        keyed: dict[str, int] = {}
        unkeyed = []
        for seq, positions in self.calls.items():  # all of them precede the mark
            first = self.records[positions[0]]
            if "key" in first:
                keyed[first["key"]] = seq
            else:
                unkeyed.append(seq)
        self._mark = _Mark(
            pos=pos,
            next=int(rec["next"]),
            n=int(rec.get("n", 0)),
            first=int(rec.get("from", 0)),
            keyed=keyed,
            unkeyed=sorted(unkeyed),
        )
        self._matched = 0
        self._rebased = False

    # -- matching calls ---------------------------------------------------------

    def in_compacted_stretch(self) -> bool:
        """True while calls are matched by the rule for a compacted log."""
        return self._mark is not None and not self._rebased

    def begin(
        self, p: str, name: str | None, key: str | None, at: str, step: str | None = None
    ) -> Step:
        """The records that answer the next durable call ``p``. ``step``: a save's
        explicit ``name=``, checked against the recorded one (a derived name, a
        function's, is not: renaming a function keeps old logs replaying).

        ``stop_at``: the call a cancel-revert interrupted (its compensations follow
        in the log); a replay stops there with CancelRun, as the first run did."""
        if self.stop_at is not None and self.next_seq == self.stop_at:
            raise CancelRun()
        if self.in_compacted_stretch():
            kept = self._kept(p, name, key, at)
            if kept is not None:
                return kept
            self._rebase(describe(p, name, at, key), strict=False)
            if key is None:  # a keyed call is never the first after the loop
                self._skip_tail(lambda rec: _same(rec, p, name, key))
        seq = self.next_seq
        self.next_seq += 1
        positions = self.calls.get(seq)
        recs = [self.records[i] for i in positions] if positions else []
        if recs:
            first = recs[0]
            recorded_step = first.get("step")
            if not _same(first, p, name, key) or (
                step is not None and recorded_step is not None and recorded_step != step
            ):
                self._diverged(seq, describe(p, name, at, key, step), describe_record(first))
        elif seq < self.max_seq:
            self._diverged(
                seq, describe(p, name, at, key, step), "no record for it, though later ones"
            )
        return Step(seq, recs, done=seq < self.max_seq)

    def _kept(self, p: str, name: str | None, key: str | None, at: str) -> Step | None:
        """Rule 1: a call before the mark, answered from the kept records."""
        mark = self._mark
        assert mark is not None
        if key is not None:
            seq = mark.keyed.get(key)
            if seq is None:
                return None
        elif self._matched < len(mark.unkeyed):
            seq = mark.unkeyed[self._matched]
        else:
            return None
        recs = [self.records[i] for i in self.calls[seq]]
        first = recs[0]
        if first.get("p") != p or first.get("name") != name:
            if key is not None:
                self._diverged(seq, describe(p, name, at, key), describe_record(first))
            return None
        if key is None:
            self._matched += 1
        return Step(seq, recs, done=True)

    def _rebase(self, call: str, *, strict: bool) -> None:
        """Rules 2 and 3: from here on, calls match by sequence id from the mark."""
        mark = self._mark
        assert mark is not None
        left = mark.unkeyed[self._matched :]
        if not strict:
            left = [s for s in left if s < mark.first]  # skipped rounds may stay unread
        if left:
            rec = self.records[self.calls[left[0]][0]]
            self._diverged(left[0], call, describe_record(rec))
        self._rebased = True
        self.next_seq = mark.next
        self.compacts = mark.n

    def _skip_tail(self, stop: Callable[[R.Record], bool]) -> None:
        """After leaving the loop early (rule 3): step over the keyed calls the live
        run made after compacting, up to the first one ``stop`` accepts."""
        while self.next_seq in self.calls:
            first = self.records[self.calls[self.next_seq][0]]
            if "key" not in first or stop(first):
                return
            self.next_seq += 1

    def patch(self, patch_id: str, *, deprecated: bool) -> tuple[bool, int | None]:
        """``patched(id)`` (or ``deprecate_patch(id)``): whether the run takes the
        patched code, and the sequence id of the marker to record (None: none).

        A marker holds a sequence id only where the log has one: a run that passed
        this point before the patch has none here, so it takes the old code and
        its later calls keep their ids. At the live edge the run takes the patch
        and records its marker; a deprecated patch records nothing (new runs need
        none) but still steps over the marker of a run that has it."""
        if self.in_compacted_stretch():  # a marker is keyed by its id: rule 1
            mark = self._mark
            assert mark is not None
            return patch_key(patch_id) in mark.keyed, None
        seq = self.next_seq
        positions = self.calls.get(seq)
        if positions:
            if not _is_marker(self.records[positions[0]], patch_id):
                return False, None  # this point was passed before the patch
            self.next_seq += 1
            return True, None
        if seq <= self.max_seq or deprecated:
            return seq > self.max_seq, None
        self.next_seq += 1
        return True, seq

    def compact_here(self) -> bool:
        """A ``compact()`` call: True if it is at the live edge and must compact."""
        self.compacts += 1
        mark = self._mark
        if mark is not None and not self._rebased:
            if self.compacts >= mark.n:
                self._rebase("compact()", strict=True)
            return False
        return self.next_seq > self.max_seq

    def live(self) -> bool:
        """True if the next call is past everything the log recorded."""
        return not self.in_compacted_stretch() and self.next_seq > self.max_seq

    def next_recorded(self) -> R.Record | None:
        later = [s for s in self.calls if s >= self.next_seq]
        return self.records[self.calls[min(later)][0]] if later else None

    def check_complete(self) -> None:
        """The workflow returned: it must have made every call the log recorded."""
        if self.in_compacted_stretch():
            self._rebase("return (the workflow ended)", strict=False)
            self._skip_tail(lambda rec: False)
        for seq in sorted(s for s in self.calls if s >= self.next_seq):
            rec = self.records[self.calls[seq][0]]
            self._diverged(seq, "return (the workflow ended)", describe_record(rec))

    def _diverged(self, seq: int, expected: str, recorded: str) -> None:
        raise NonDeterminismError(
            run_id=self.run_id,
            step=seq,
            expected=expected,
            recorded=recorded,
            unreached=self._unreached(seq),
        )

    def _unreached(self, seq: int) -> list[str]:
        """The recorded calls after ``seq`` the replay never got to."""
        later = sorted(s for s in self.calls if s > seq)
        return [describe_record(self.records[self.calls[s][0]]) for s in later]

    # -- events -----------------------------------------------------------------

    def final(self, step: Step) -> R.Record | None:
        """The call's final record, if the log has it (its events become visible)."""
        for pos in self.calls.get(step.seq, ()) if step.records else ():
            rec = self.records[pos]
            if R.is_final(rec):
                self.advance(pos + 1)
                return rec
        return None

    def advance(self, to: int) -> None:
        """Make events before position ``to`` visible, in log order."""
        if to <= self.cursor:
            return
        lo = bisect.bisect_left(self.event_pos, self.cursor)
        hi = bisect.bisect_left(self.event_pos, to)
        self.cursor = to
        for pos in self.event_pos[lo:hi]:
            self._on_visible(self.records[pos])

    def first_position(self, step: Step) -> int:
        return self.calls[step.seq][0]

    def next_event(self, name: str) -> int | None:
        """Position of the next visible, unconsumed event ``name``."""
        positions = self.by_name.get(name, ())
        n = self.consumed.get(name, 0)
        if n < len(positions) and positions[n] < self.cursor:
            return positions[n]
        return None

    def consume(self, name: str) -> None:
        self.consumed[name] = self.consumed.get(name, 0) + 1

    def visible(self, name: str) -> list[R.Record]:
        """The visible events ``name``, in log order."""
        out = []
        for pos in self.by_name.get(name, ()):
            if pos >= self.cursor:
                break
            out.append(self.records[pos])
        return out

    def unconsumed(self, skip: Callable[[str], bool]) -> list[R.Record]:
        """Events in the log no receive consumed, in log order, but for names ``skip``
        says to leave out."""
        out = []
        for pos in self.event_pos:
            name = self.records[pos]["name"]
            if not skip(name) and self.by_name[name].index(pos) >= self.consumed.get(name, 0):
                out.append(self.records[pos])
        return out
