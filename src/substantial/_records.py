"""Log record shapes.

A run's log is a list of JSON objects; ``k`` says what each one is. Records of
durable calls carry ``s``, the call's sequence id, and ``p``, the primitive
that made it (checked on replay), plus ``at``, the code location. A call may
leave intermediate records (a failed attempt, an armed timeout) before its
final one.

Fields for the history only (never checked on replay, absent from older logs,
which replay and display without them): ``t0`` (epoch seconds) when the call
was made, for a save when its attempt's effect started; ``ms`` how long a
save's effect took; ``step`` a save's display name; an event's ``t``, when the
run took it in.

=========  ==========================================================
k          fields
=========  ==========================================================
start      wf, kw (kwargs), t (epoch seconds); origin, traceparent, tracestate if any
event      name, v (payload), id (inbox id), t
call       s, p, at, t0, and the outcome: v (value) | err {type,msg,n} | to (timed out)
           | ev (receive: the event's log position); save: step, ms;
           patched(): p "patch", name (the patch id), key "patch:<id>", v true
try        s, p, at, t0, n (attempt), err {type,msg}, retry (epoch seconds); step, ms [save]
arm        s, p, at, t0, due (epoch seconds, or None)  [sleep; receive, ensure that wait]
log        s, p, at, level, msg, fields, t
mark       p ("compact"), next (sequence id reached), n (compactions), from (first keyed)
state      name (the published key), v (its value), t: c.publish(); no sequence id, never
           matched on replay (written at the live edge only); compaction keeps the last
end        status, v | err {type, msg, tb (the workflow code's traceback)}
=========  ==========================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import orjson

from .errors import CorruptRecord

START: Final = "start"
EVENT: Final = "event"
CALL: Final = "call"  # a durable call's final record
TRY: Final = "try"
ARM: Final = "arm"
LOG: Final = "log"
END: Final = "end"
MARK: Final = "mark"  # where compact() rewrote the log
STATE: Final = "state"  # a value published for readers outside the run

KINDS: Final = frozenset({START, EVENT, CALL, TRY, ARM, LOG, END, MARK, STATE})


def published(records: Iterable[Record]) -> dict[str, Any]:
    """The latest value of each key the run published, as of these records."""
    return {r["name"]: r.get("v") for r in records if r["k"] == STATE}


CHILD_OUTCOME: Final = "substantial.child:"  # prefix of the event carrying a child's outcome

Record = dict[str, Any]


def child_outcomes(records: Iterable[Record]) -> set[str]:
    """The names of the child outcomes already in ``records``: a parent takes each
    in once, though both the child's worker and the parent itself may send it."""
    return {
        name
        for r in records
        if r["k"] == EVENT and (name := str(r.get("name"))).startswith(CHILD_OUTCOME)
    }


def is_final(rec: Record) -> bool:
    return rec["k"] in (CALL, LOG)


def decode_record(run_id: str, position: int, data: bytes) -> Record:
    """Decode one stored record, or raise CorruptRecord saying why."""
    try:
        rec = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord(run_id, position, f"not valid JSON ({exc})") from None
    if not isinstance(rec, dict) or rec.get("k") not in KINDS:
        raise CorruptRecord(run_id, position, "not a Substantial record (unknown kind)")
    if position == 0 and rec["k"] != START:
        raise CorruptRecord(run_id, 0, "the log does not begin with a start record")
    if rec["k"] in (CALL, TRY, ARM, LOG) and not isinstance(rec.get("s"), int):
        raise CorruptRecord(run_id, position, "durable-call record without a sequence id")
    return rec
