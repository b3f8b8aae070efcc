"""Published state in the Redis store (``RunRecord.state``), kept with the run so a
search by it reads no log (``P`` = the prefix, under its hash tag like every key)::

    {P}:state:<id>    hash    the run's latest published values: field = the key
                              (UTF-8), value = the value's JSON as orjson encoded
                              it in Python
    {P}:run:<id>      field   st = 1: the run keeps that index (set by create_run)

Each value stays the bytes Python encoded: Lua never decodes it (cjson would
re-encode floats with 14 digits, and turn ``1.0`` into ``1``), so a value comes
back with its exact JSON type. ``HSET`` of a key replaces its bytes: the merge
rule (``_rules.merged_state``, the latest value wins) is per field.

A run without ``st`` was made before the store kept the index: its state reads
as None (the caller reads its log), and appends to it write no state hash (a
partial index would hide what its log published before). The append script
writes the hash in the same script as the log, so it never drifts from it; an
append that publishes nothing sends a count of 0 and runs no extra command.

``ROWS`` reads run hashes with their state hashes for ``get_run`` and
``list_runs``: one round trip, each run and its state read together (a script is
atomic). ``RunQuery.state_equals`` is checked in Python on each page
(``_rules.matches``: JSON equality, ``1 == 1.0``), as the store's other fields are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from ._protocol import RunRecord
from ._redis_codec import to_record

MARKER = b"st"  # the run-hash field of a run whose state the store keeps

# KEYS {P}:runs (it names the slot); ARGV the run-key prefix, the state-key prefix, run
# ids. Returns, per id, {run hash, state hash} as flat field/value lists ({} if none).
ROWS = """
local out = {}
for i = 3, #ARGV do
  local h = redis.call('HGETALL', ARGV[1] .. ARGV[i])
  local s = {}
  if #h > 0 then s = redis.call('HGETALL', ARGV[2] .. ARGV[i]) end
  out[i - 2] = {h, s}
end
return out
"""


def state_args(state: Mapping[str, Any] | None) -> list[Any]:
    """The state part of a create or append script's ARGV: how many entries
    follow, then key, JSON, key, JSON... (``[0]`` when nothing is published)."""
    if not state:
        return [0]
    flat: list[Any] = []
    for key, value in state.items():
        flat += (key, orjson.dumps(value))
    return [len(flat), *flat]


def pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """A flat HGETALL reply from a script (field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def record(run_hash: Sequence[bytes], state_hash: Sequence[bytes]) -> RunRecord | None:
    """The record of a script's reply (None for a missing run): its state is the
    decoded state hash if the run keeps one (``st``), else None."""
    if not run_hash:
        return None
    h = pairs(run_hash)
    if MARKER not in h:
        return to_record(h)
    state = {
        state_hash[i].decode(): orjson.loads(state_hash[i + 1])
        for i in range(0, len(state_hash), 2)
    }
    return to_record(h, state=state)


def records(reply: Sequence[Sequence[Sequence[bytes]]]) -> list[RunRecord]:
    """The records of a ``ROWS`` reply, missing runs left out."""
    out = []
    for run_hash, state_hash in reply:
        rec = record(run_hash, state_hash)
        if rec is not None:
            out.append(rec)
    return out
