"""The rules every store shares, written once.

The protocol (``_protocol.py``) states them; the stores that keep their runs as
Python objects (memory, files) apply them through these functions, and the
stores that apply them server-side (SQL, Lua) mirror them and are held to the
same conformance suite. Error texts and credential scrubbing live here too, so
every store reports the same failure the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from .._types import RunStatus
from ..errors import LeaseLost
from ._protocol import NewRun, QueueLimits, RunCounts, RunQuery, RunRecord, RunUpdate

TERMINAL: tuple[str, ...] = tuple(s.value for s in RunStatus if s.is_terminal)


# -- runs -------------------------------------------------------------------------


def new_record(new: NewRun) -> RunRecord:
    """The record ``create_run`` stores: PENDING, a log of first + more records."""
    return RunRecord(
        run_id=new.run_id,
        workflow=new.workflow,
        queue=new.queue,
        status=RunStatus.PENDING,
        created_at=new.created_at,
        due_at=new.due_at,
        log_len=1 + len(new.more_records),
        parent_id=new.parent_id,
        priority=new.priority,
        concurrency_key=new.concurrency_key,
        state=dict(new.state or {}),
    )


def claimable(rec: RunRecord, queue: str, workflows: Iterable[str], now: float) -> bool:
    """Due, not leased (or the lease expired), not terminal, in the claimer's set."""
    return (
        rec.queue == queue
        and rec.workflow in workflows
        and rec.due_at is not None
        and rec.due_at <= now
        and (rec.lease_expires_at is None or rec.lease_expires_at <= now)
        and not rec.status.is_terminal
    )


def claim_order(limits: QueueLimits | None) -> Callable[[RunRecord], tuple[Any, ...]]:
    """The order a claim takes candidates in: by due time, or by priority first."""
    if limits is not None and limits.priority:
        return lambda r: (r.priority, r.due_at or 0.0, r.created_at, r.run_id)
    return lambda r: (r.due_at or 0.0, r.created_at, r.run_id)


def holds_slot(rec: RunRecord, queue: str, now: float) -> bool:
    """Whether ``rec`` takes one of its queue's concurrency slots: a live lease."""
    return (
        rec.queue == queue
        and rec.lease_owner is not None
        and rec.lease_expires_at is not None
        and rec.lease_expires_at > now
        and not rec.status.is_terminal
    )


class LimitGate:
    """Admits a claim's candidates, in claim order, under a queue's limits
    (:class:`QueueLimits`), given what the store holds now: ``busy`` slots per
    concurrency key and the ``starts`` (``started_at``) of the queue's runs in
    the rate's window. One implementation for every store: the Python-object
    stores feed it their records, the SQL stores their counts, in the claim's
    own transaction. (The Lua store mirrors it.)"""

    def __init__(
        self,
        limits: QueueLimits | None,
        *,
        busy: Mapping[str | None, int],
        starts: Iterable[float],
        now: float,
    ) -> None:
        self._limits = limits or QueueLimits()
        self._busy = dict(busy)
        self._now = now
        window = self._limits.period
        self._starts = sorted(s for s in starts if s > now - window)
        self.held_until: float | None = None

    def admit(self, key: str | None, *, started: bool) -> bool:
        """Whether a candidate of slot group ``key`` (``started``: it started
        before) may be claimed; if so, its slot and start are counted."""
        lim = self._limits
        if lim.concurrency is not None and self._busy.get(key, 0) >= lim.concurrency:
            return False
        if lim.rate is not None and not started:
            if lim.rate <= 0:
                return False  # (Conductor.queue refuses such a rate; a caller may not)
            if len(self._starts) >= lim.rate:
                free_at = self._starts[len(self._starts) - lim.rate] + lim.period
                if self.held_until is None or free_at < self.held_until:
                    self.held_until = free_at
                return False
            self._starts.append(self._now)
            self._starts.sort()
        self._busy[key] = self._busy.get(key, 0) + 1
        return True


def limited(limits: QueueLimits | None) -> bool:
    """Whether a claim under ``limits`` needs the gate at all."""
    return limits is not None and (limits.concurrency is not None or limits.rate is not None)


def claimed(rec: RunRecord, *, owner: str, lease_seconds: float, now: float) -> RunRecord:
    """The claim: RUNNING, started (once), a new lease with the next token."""
    return rec.evolve(
        status=RunStatus.RUNNING,
        started_at=now if rec.started_at is None else rec.started_at,
        lease_token=rec.lease_token + 1,
        lease_owner=owner,
        lease_expires_at=now + lease_seconds,
    )


def apply_update(rec: RunRecord, u: RunUpdate | None, *, log_len: int | None = None) -> RunRecord:
    """The fields of ``u`` that are set (the release rule is :func:`apply_release`),
    and the new ``log_len`` of an append, in one copy."""
    if u is None:  # a step's records alone: the common append
        return rec if log_len is None else rec.evolve(log_len=log_len)
    changes: dict[str, Any] = {} if log_len is None else {"log_len": log_len}
    if u.status is not None:
        changes["status"] = u.status
    if u.has_result:
        changes["result"] = u.result
    if u.error is not None:
        changes["error"] = u.error
    if u.error_type is not None:
        changes["error_type"] = u.error_type
    if u.ended_at is not None:
        changes["ended_at"] = u.ended_at
    if u.inbox_pos is not None:
        changes["inbox_pos"] = u.inbox_pos
    if u.state and rec.state is not None:
        changes["state"] = merged_state(rec.state, u.state)
    return rec.evolve(**changes) if changes else rec


def merged_state(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """A run's published state after an append publishing ``new``: key by key, the
    latest value wins. (A run with no index, None, keeps none: what it published
    before is in its log only.)"""
    return {**(old or {}), **new}


def appended(
    rec: RunRecord, u: RunUpdate | None, *, log_len: int, last_inbox_id: int, now: float
) -> tuple[RunRecord, bool]:
    """The row after an append that made the log ``log_len`` long with update ``u``
    (``last_inbox_id``: the newest inbox item's id), and whether the append
    dropped the lease (the run ended or was released): the stores that keep the
    row as a record (memory, files) share this."""
    rec = apply_update(rec, u, log_len=log_len)
    ends = releases(rec, u)
    if ends and u is not None:
        rec = apply_release(rec, u.due_at, now, last_inbox_id > rec.inbox_pos)
    return rec, ends


def ends_lease(u: RunUpdate | None) -> bool:
    """Whether an append with ``u`` releases or ends the run (so it is hinted, and
    the file store updates the queue index). A run already terminal before had
    its lease and due time cleared, and was hinted, then."""
    return u is not None and (u.release or (u.status is not None and u.status.is_terminal))


def releases(rec: RunRecord, u: RunUpdate | None) -> bool:
    """Whether an append with ``u`` (already applied to ``rec``) drops the lease."""
    return u is not None and (u.release or rec.status.is_terminal)


def apply_release(rec: RunRecord, due_at: float | None, now: float, pending: bool) -> RunRecord:
    """Drop the lease and set the next due time; a pending delivery or cancel makes
    the run due now (so a delivery racing a release is never stranded); a terminal
    run is never due."""
    if rec.status.is_terminal:
        due_at = None
    elif pending or rec.cancel_requested:
        due_at = now if due_at is None else min(due_at, now)
    return rec.evolve(due_at=due_at, lease_owner=None, lease_expires_at=None)


def released(
    rec: RunRecord, *, status: RunStatus, due_at: float | None, now: float, pending: bool
) -> RunRecord:
    """``release``: the status (unless already terminal), then the release rule."""
    rec = rec if rec.status.is_terminal else rec.evolve(status=status)
    return apply_release(rec, due_at, now, pending)


def reopened(rec: RunRecord, *, keep_len: int, now: float) -> RunRecord:
    """``reopen``: PENDING and due now, as if never ended, with a log of ``keep_len``."""
    return rec.evolve(
        status=RunStatus.PENDING,
        ended_at=None,
        result=None,
        error=None,
        error_type=None,
        due_at=now,
        lease_owner=None,
        lease_expires_at=None,
        cancel_requested=False,
        revert_requested=False,
        log_len=keep_len,
    )


def holds_lease(rec: RunRecord | None, token: int) -> bool:
    """``renew`` and ``release`` act only for the current token of a leased run."""
    return rec is not None and rec.lease_token == token and rec.lease_owner is not None


def log_moved(run_id: str, length: object, expected: int) -> LeaseLost:
    """The append fence's second refusal: another writer appended first."""
    return LeaseLost(run_id, f"run {run_id!r}: log length is {length}, expected {expected}")


def check_fence(run_id: str, rec: RunRecord, token: int, expected_len: int) -> None:
    """The append fence: ``token`` and ``expected_len`` must both be current."""
    if rec.lease_token != token:
        raise LeaseLost(run_id)
    if rec.log_len != expected_len:
        raise log_moved(run_id, rec.log_len, expected_len)


# -- search -----------------------------------------------------------------------


def _within(value: float | None, low: float | None, high: float | None) -> bool:
    if low is None and high is None:
        return True
    if value is None:
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def matches(rec: RunRecord, q: RunQuery) -> bool:
    """Whether ``rec`` matches every set field of ``q`` (the cursor included)."""
    return (
        (q.workflow is None or rec.workflow == q.workflow)
        and (q.statuses is None or rec.status in q.statuses)
        and (q.run_ids is None or rec.run_id in q.run_ids)
        and _within(rec.created_at, q.created_after, q.created_before)
        and _within(rec.started_at, q.started_after, q.started_before)
        and _within(rec.ended_at, q.ended_after, q.ended_before)
        and (q.before is None or (rec.created_at, rec.run_id) < q.before)
        and all(state_may_equal(rec.state, key, value) for key, value in q.state_equals)
    )


def state_may_equal(state: Mapping[str, Any] | None, key: str, value: Any) -> bool:
    """The ``state_equals`` narrowing: the run published ``value`` under ``key``, or
    the store holds no index of what it published (None)."""
    return state is None or (key in state and state[key] == value)


def newest_first(records: Iterable[RunRecord], q: RunQuery) -> list[RunRecord]:
    """The matching records in the query's order, cut at its limit."""
    out = sorted(
        (r for r in records if matches(r, q)),
        key=lambda r: (r.created_at, r.run_id),
        reverse=True,
    )
    return out if q.limit is None else out[: max(q.limit, 0)]


def tally(records: Iterable[RunRecord]) -> RunCounts:
    """``count_runs`` for the stores that hold their runs as Python objects."""
    out: RunCounts = {}
    for rec in records:
        key = (rec.workflow, rec.status)
        out[key] = out.get(key, 0) + 1
    return out


# -- credentials ------------------------------------------------------------------

_SECRET_KEYS = frozenset({"password", "user", "username", "sslpassword"})


def secrets(url: str) -> list[str]:
    """Every credential a store URL holds (raw and percent-decoded), longest first."""
    try:
        p = urlsplit(url)
        found = [p.password or "", unquote(p.password or "")]
        found += [v for k, v in parse_qsl(p.query) if k.lower() in _SECRET_KEYS]
    except ValueError:
        return []
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, hidden: Iterable[str]) -> str:
    """``text`` with each of ``hidden`` replaced by ``***``."""
    for secret in hidden:
        text = text.replace(secret, "***")
    return text


def redact(url: str) -> str:
    """The URL without credentials or query (which may hold ``password=``), for messages."""
    try:
        p = urlsplit(url)
        host = p.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{p.port}" if p.port else "")
    except ValueError:
        return "<unparseable store URL>"
    if p.username or p.password:
        netloc = "***@" + netloc
    return urlunsplit((p.scheme, netloc, p.path, "", ""))
