"""Compaction as a pure function: a run's records in, the records it keeps out.

``compact()`` bounds the log of a looping workflow. What it keeps:

* every record without a ``key`` (the start, events, unkeyed calls, log lines),
  but only the latest published value of each state key;
* for each key, the records of its last call (a save's failed attempts stay
  with its final record: they are one call);
* one **mark** record, last, holding ``next``, the sequence id the run had
  reached when it compacted, ``n``, the ``compact()`` calls it had made, and
  ``from``, the sequence id of its first keyed call (where the compacted
  stretch begins). An older mark is dropped; only the latest one tells replay
  where the compacted stretch ends (see ``_replay``).

Receive records point at their event by log position (``ev``); positions are
renumbered to the kept log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import _records as R


@dataclass(frozen=True, kw_only=True, slots=True)
class Compacted:
    records: list[R.Record]  # the new log; its last record is the mark
    origin: list[int]  # origin[i]: the old position of records[i] (the mark: len(old))

    def position_of(self, old: int) -> int:
        """The new position of what was at ``old`` or after it (for a cursor)."""
        lo, hi = 0, len(self.origin) - 1  # the mark is not a position anything had
        while lo < hi:
            mid = (lo + hi) // 2
            if self.origin[mid] < old:
                lo = mid + 1
            else:
                hi = mid
        return lo


def compact(records: Sequence[R.Record], *, next_seq: int, compacts: int) -> Compacted | None:
    """The kept records of ``records`` (a whole log), compacted by the run's
    ``compacts``-th ``compact()`` call at sequence id ``next_seq``; None when
    compaction would drop no call."""
    last: dict[str, int] = {}
    first = next_seq
    for rec in records:
        if "key" in rec:
            last[rec["key"]] = max(last.get(rec["key"], -1), rec["s"])
            if rec.get("p") != "patch":  # a patch marker is keyed to stay one, not a loop's
                first = min(first, rec["s"])
        elif rec["k"] == R.MARK:
            first = min(first, int(rec.get("from", first)))
    state = {rec["name"]: i for i, rec in enumerate(records) if rec["k"] == R.STATE}
    keep = [
        i
        for i, rec in enumerate(records)
        if rec["k"] != R.MARK
        and ("key" not in rec or rec["s"] == last[rec["key"]])
        and (rec["k"] != R.STATE or state[rec["name"]] == i)  # a key's latest value
    ]
    kept_calls = len(keep)
    if kept_calls == sum(1 for rec in records if rec["k"] != R.MARK):
        return None  # nothing but an older mark would go
    moved = {old: new for new, old in enumerate(keep)}
    kept = [
        {**records[i], "ev": moved[records[i]["ev"]]} if "ev" in records[i] else records[i]
        for i in keep
    ]
    kept.append({"k": R.MARK, "p": "compact", "next": next_seq, "n": compacts, "from": first})
    return Compacted(records=kept, origin=[*keep, len(records)])
