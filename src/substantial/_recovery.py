"""Where the recovery actions cut a log: resume (an ended run replayed anew) and
fork (a new run from a prefix of another's log).

Pure functions over decoded records; the journal applies them with the store's
``reopen`` and ``create_run`` (see ``Journal.resume`` and ``Journal.fork``).
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _records as R
from .errors import ClientError, CorruptRecord


def decoded(run_id: str, raw: Sequence[bytes]) -> list[R.Record]:
    """The records of a log; a corrupt one reads as kind "corrupt" (it is never cut
    through: it stays, and the replay fails on it as before)."""
    out: list[R.Record] = []
    for i, data in enumerate(raw):
        try:
            out.append(R.decode_record(run_id, i, data))
        except CorruptRecord:
            out.append({"k": "corrupt"})
    return out


def resume_point(records: Sequence[R.Record]) -> int:
    """How many records of an ended run's log a resume keeps.

    All but the end record; and when the failure was a call whose final record
    holds the error (a save that exhausted its retries), that record and its
    attempts right before it too, so that call runs again with a fresh retry
    budget. Log lines written after the failed call go as well (the replay writes
    them again). Events are never cut: a failed call with an event recorded after
    it stays failed (its error is then raised again on replay)."""
    n = len(records)
    if n and records[n - 1]["k"] == R.END:
        n -= 1
    m = n
    while m and records[m - 1]["k"] == R.LOG:
        m -= 1
    last = records[m - 1] if m else None
    if last is None or last["k"] != R.CALL or last.get("err") is None:
        return n
    seq, m = last["s"], m - 1
    while m and records[m - 1]["k"] == R.TRY and records[m - 1].get("s") == seq:
        m -= 1
    return m


def fork_point(records: Sequence[R.Record], from_step: int) -> int:
    """How many records a fork from durable call ``from_step`` copies: everything
    before that call's first record (events included), nothing from it on."""
    if from_step < 0:
        raise ClientError(f"fork: from_step must be a step number >= 0, not {from_step}")
    for i, rec in enumerate(records):
        if i and rec["k"] in (R.MARK, "corrupt"):
            raise ClientError(
                "fork: the log was compacted or holds a corrupt record; it cannot be cut"
            )
        seq = rec.get("s")
        if rec["k"] in (R.CALL, R.TRY, R.ARM, R.LOG) and isinstance(seq, int) and seq >= from_step:
            return i
        if rec["k"] == R.END:
            return i
    return len(records)
