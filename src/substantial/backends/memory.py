"""The in-memory store: the reference implementation of the protocol.

Public and real, for users' tests: a :class:`MemoryBackend` is private to its
process (``memory://``), keeps everything in dicts, and signals every change
in-process, so a worker never polls it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .._types import RunStatus
from ..errors import RunFinished, RunNotFound
from . import _registry as registry
from . import _rules as rules
from ._hub import LocalHub
from ._protocol import (
    ALL_RUNS,
    Claim,
    Claims,
    InboxItem,
    NewRun,
    QueueLimits,
    RunCounts,
    RunQuery,
    RunRecord,
    RunUpdate,
    Snapshot,
    WorkerRecord,
)


@dataclass
class _Run:
    rec: RunRecord
    log: list[bytes] = field(default_factory=list)
    inbox: list[InboxItem] = field(default_factory=list)
    last_inbox_id: int = 0


class MemoryBackend:
    """Process-local store. ``MemoryBackend()`` or ``open_backend("memory://")``."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        # The runs a claim may take (a due time, not terminal): a claim scans these,
        # not every run the store ever held (a test's store keeps thousands ended).
        self._due: dict[str, _Run] = {}
        self._workers: dict[str, WorkerRecord] = {}
        self._hub = LocalHub()
        self.calls: dict[str, int] = {}  # operation -> count, for tests and curiosity

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    def _set(self, r: _Run, rec: RunRecord) -> None:
        """The one way a run's record changes: the claim index follows it."""
        r.rec = rec
        if rec.due_at is not None and not rec.status.is_terminal:
            self._due[rec.run_id] = r
        else:
            self._due.pop(rec.run_id, None)

    @property
    def poll_interval(self) -> float | None:
        return None

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def subscribe(self) -> AsyncIterator[str]:
        return self._hub.subscribe()

    async def create_run(self, new: NewRun) -> bool:
        self._count("create_run")
        if new.run_id in self._runs:
            return False
        log = [new.first_record, *new.more_records]
        run = self._runs[new.run_id] = _Run(rec=rules.new_record(new), log=log)
        self._set(run, run.rec)
        self._hub.publish(new.run_id)
        return True

    async def claim_due(
        self,
        *,
        queue: str,
        workflows: Collection[str],
        limit: int,
        owner: str,
        lease_seconds: float,
        now: float,
        limits: QueueLimits | None = None,
    ) -> list[Claim]:
        self._count("claim_due")
        wanted = set(workflows)
        due = [r for r in self._due.values() if rules.claimable(r.rec, queue, wanted, now)]
        order = rules.claim_order(limits)
        due.sort(key=lambda r: order(r.rec))
        gate = self._gate(queue, limits, now) if rules.limited(limits) else None
        claims = Claims()
        for r in due:
            if len(claims) >= limit:
                break
            if gate is not None and not gate.admit(
                r.rec.concurrency_key, started=r.rec.started_at is not None
            ):
                continue
            self._set(r, rules.claimed(r.rec, owner=owner, lease_seconds=lease_seconds, now=now))
            claims.append(Claim(run_id=r.rec.run_id, token=r.rec.lease_token))
        claims.held_until = None if gate is None else gate.held_until
        return claims

    def _gate(self, queue: str, limits: QueueLimits | None, now: float) -> rules.LimitGate:
        """The limits' gate over what this store holds now: leased runs (all in the
        claim index: a leased run keeps its due time) and the queue's starts (a
        scan of every run: the memory store is for tests and small programs)."""
        busy: dict[str | None, int] = {}
        for r in self._due.values():
            if rules.holds_slot(r.rec, queue, now):
                busy[r.rec.concurrency_key] = busy.get(r.rec.concurrency_key, 0) + 1
        starts = [
            r.rec.started_at
            for r in self._runs.values()
            if r.rec.queue == queue and r.rec.started_at is not None
        ]
        return rules.LimitGate(limits, busy=busy, starts=starts, now=now)

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None:
        self._count("read")
        r = self._runs.get(run_id)
        if r is None:
            return None
        pending = [i for i in r.inbox if i.id > r.rec.inbox_pos]
        return Snapshot(run=r.rec, log=r.log[log_from:], inbox=pending)

    async def read_log_page(
        self, run_id: str, *, start: int, stop: int
    ) -> tuple[RunRecord, list[bytes]] | None:
        self._count("read_log_page")
        r = self._runs.get(run_id)
        return None if r is None else (r.rec, r.log[start : max(start, stop)])

    def _owned(self, run_id: str, token: int, expected_len: int) -> _Run:
        """The run, if ``token`` and ``expected_len`` are current (the append fence)."""
        r = self._runs.get(run_id)
        if r is None:
            raise RunNotFound(run_id)
        rules.check_fence(run_id, r.rec, token, expected_len)
        return r

    async def append(
        self,
        run_id: str,
        *,
        token: int,
        expected_len: int,
        records: Sequence[bytes],
        update: RunUpdate | None = None,
        now: float,
    ) -> int:
        self._count("append")
        r = self._owned(run_id, token, expected_len)
        r.log.extend(records)
        rec, ends = rules.appended(
            r.rec, update, log_len=len(r.log), last_inbox_id=r.last_inbox_id, now=now
        )
        self._set(r, rec)
        if ends:
            self._hub.publish(run_id)
        return rec.log_len

    async def rewrite_log(
        self,
        run_id: str,
        *,
        token: int,
        expected_len: int,
        records: Sequence[bytes],
        now: float,
    ) -> int:
        self._count("rewrite_log")
        r = self._owned(run_id, token, expected_len)
        r.log = list(records)
        self._set(r, r.rec.evolve(log_len=len(r.log)))
        return r.rec.log_len

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        self._count("renew")
        held = set()
        for run_id, token in leases.items():
            r = self._runs.get(run_id)
            if r is None or not rules.holds_lease(r.rec, token):
                continue
            self._set(r, r.rec.evolve(lease_expires_at=now + lease_seconds))
            held.add(run_id)
        return held

    async def release(
        self,
        run_id: str,
        *,
        token: int,
        due_at: float | None,
        status: RunStatus,
        now: float,
    ) -> bool:
        self._count("release")
        r = self._runs.get(run_id)
        if r is None or not rules.holds_lease(r.rec, token):
            return False
        pending = r.last_inbox_id > r.rec.inbox_pos
        self._set(r, rules.released(r.rec, status=status, due_at=due_at, now=now, pending=pending))
        self._hub.publish(run_id)
        return True

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        self._count("deliver")
        r = self._runs.get(run_id)
        if r is None:
            raise RunNotFound(run_id)
        if r.rec.status.is_terminal:
            raise RunFinished(run_id, r.rec.status.value)
        r.last_inbox_id += 1
        r.inbox.append(InboxItem(id=r.last_inbox_id, data=data))
        self._set(r, r.rec.evolve(due_at=now))
        self._hub.publish(run_id)
        return r.last_inbox_id

    async def request_cancel(self, run_id: str, *, now: float, revert: bool = False) -> None:
        self._count("request_cancel")
        r = self._runs.get(run_id)
        if r is None:
            raise RunNotFound(run_id)
        if r.rec.status.is_terminal:
            return
        revert = revert or r.rec.revert_requested
        self._set(r, r.rec.evolve(cancel_requested=True, revert_requested=revert, due_at=now))
        self._hub.publish(run_id)

    async def reopen(
        self, run_id: str, *, status: RunStatus, expected_len: int, keep_len: int, now: float
    ) -> bool:
        self._count("reopen")
        r = self._runs.get(run_id)
        if r is None:
            raise RunNotFound(run_id)
        if r.rec.status != status or r.rec.log_len != expected_len:
            return False
        del r.log[keep_len:]
        self._set(r, rules.reopened(r.rec, keep_len=keep_len, now=now))
        self._hub.publish(run_id)
        return True

    async def get_run(self, run_id: str) -> RunRecord | None:
        self._count("get_run")
        r = self._runs.get(run_id)
        return None if r is None else r.rec

    async def list_runs(self, query: RunQuery = ALL_RUNS) -> list[RunRecord]:
        self._count("list_runs")
        return rules.newest_first((r.rec for r in self._runs.values()), query)

    async def count_runs(self) -> RunCounts:
        self._count("count_runs")
        return rules.tally(r.rec for r in self._runs.values())

    # -- the worker registry ------------------------------------------------------

    async def register_worker(self, info: WorkerRecord, *, now: float) -> None:
        self._count("register_worker")
        self._workers[info.worker_id] = replace(info, last_beat=now)

    async def beat_worker(self, worker_id: str, *, now: float) -> bool:
        self._count("beat_worker")
        w = self._workers.get(worker_id)
        if w is None:
            return False
        self._workers[worker_id] = replace(w, last_beat=now)
        return True

    async def remove_worker(self, worker_id: str) -> None:
        self._count("remove_worker")
        self._workers.pop(worker_id, None)

    async def list_workers(self, *, now: float) -> list[WorkerRecord]:
        self._count("list_workers")
        return registry.live(self._workers.values(), now)

    # -- test helpers -------------------------------------------------------

    async def corrupt(self, run_id: str, position: int, data: bytes) -> None:
        """Overwrite one stored log record (to test how bad data is handled)."""
        self._runs[run_id].log[position] = data
