"""How the Redis store's values travel: run hashes to records, script arguments
(times as ``repr`` text, optional values marked), and the log scripts' replies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._types import RunStatus
from ..errors import LeaseLost, RunNotFound
from . import _rules as rules
from ._protocol import RunRecord


def num(x: float) -> str:
    return repr(float(x))


def opt(x: str | float | int | None) -> str:
    """Optional script argument: '' = None, else '=' + the value."""
    if x is None:
        return ""
    if isinstance(x, float):
        return "=" + num(x)
    return f"={x}"


def to_record(h: dict[bytes, bytes], *, state: Mapping[str, Any] | None = None) -> RunRecord:
    """A run hash as a record; ``state`` is read from its own hash (``_redis_state``)."""
    d = {k.decode(): v.decode() for k, v in h.items()}

    def f(k: str) -> float | None:
        return float(d[k]) if k in d else None

    return RunRecord(
        run_id=d["run_id"],
        workflow=d["workflow"],
        queue=d["queue"],
        status=RunStatus(d["status"]),
        created_at=float(d["created_at"]),
        started_at=f("started_at"),
        ended_at=f("ended_at"),
        due_at=f("due_at"),
        result=json.loads(d["result"]) if "result" in d else None,
        error=d.get("error"),
        error_type=d.get("error_type"),
        log_len=int(d["log_len"]),
        inbox_pos=int(d["inbox_pos"]),
        lease_token=int(d["lease_token"]),
        lease_owner=d.get("lease_owner"),
        lease_expires_at=f("lease_expires_at"),
        cancel_requested="cancel_requested" in d,
        revert_requested="revert_requested" in d,
        parent_id=d.get("parent_id"),
        priority=int(d.get("priority", 0)),  # absent on runs written before queue limits
        concurrency_key=d.get("concurrency_key"),
        state=state,
    )


def fence_outcome(run_id: str, expected_len: int, reply: Any) -> int:
    """A log-writing script's reply: the new log length, or the fencing error."""
    code, *rest = reply
    if code == -1:
        raise RunNotFound(run_id)
    if code == -2:
        raise LeaseLost(run_id)
    if code == -3:
        raise rules.log_moved(run_id, rest[0], expected_len)
    return int(rest[0])
