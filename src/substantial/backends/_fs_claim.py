"""The file store's ``claim_due``: plain claims, and claims under :class:`QueueLimits`.

Both run under the queue's lock (``queues/<name>/lock``), which every change of
a lease of the queue's runs takes: claims, releases, ends, and a renew that
revives an expired lease (``fs.py``; a renew that only extends a live lease
changes no slot). So, under that lock, which runs of the queue hold a slot and
which are claimable cannot change, and a limited claim can count, decide and
commit as one atomic step across processes:

* slots: the live leases per concurrency key, from the index (an indexed lease
  is never above the real one, so an indexed lease past ``now`` is live;
  one at or before ``now`` may have been renewed since, so ``run.json`` says);
* starts: ``queues/<name>/starts.json``, the first-claim times of the queue's
  limited claims, trimmed to the rate's window and replaced whole (rename)
  before the claims it counts are committed: a crash in between leaves a start
  too many (a run held back for one period), never one too few;
* candidates in ``rules.claim_order(limits)`` through ``rules.LimitGate``.

A claim without concurrency or rate reads neither and costs what it always did.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from .._types import RunStatus
from . import _rules as rules
from ._fs_layout import (
    Entry,
    Writer,
    dump,
    entry,
    flock,
    load_state,
    priority,
    read_index,
    slot_key,
    started,
)
from ._protocol import Claim, Claims, QueueLimits, RunRecord

STARTS = "starts.json"


@dataclass(frozen=True, slots=True)
class Ask:
    """One ``claim_due`` call."""

    queue: str
    wanted: Collection[str]
    limit: int
    owner: str
    lease: float
    now: float
    limits: QueueLimits | None


class Claimer:
    """Claims one queue's runs: ``qdir`` its directory, ``run_dir`` a run's."""

    def __init__(self, qdir: Path, run_dir: Callable[[str], Path], files: Writer) -> None:
        self._qdir = qdir
        self._run_dir = run_dir
        self._files = files

    def claim(self, ask: Ask) -> Claims:
        with flock(self._qdir / "lock"):
            idx = read_index(self._qdir)
            fixed = dict(idx)  # the index after the claim: claimed and repaired entries
            now, wanted = ask.now, ask.wanted
            # claim_order(None) on the index's fields, without making records
            due = [
                rid
                for _, _, rid in sorted(
                    (e[0], e[3], rid)
                    for rid, e in idx.items()
                    if e[2] in wanted and e[0] <= now and (e[1] is None or e[1] <= now)
                )
            ]
            if ask.limits is not None and ask.limits.priority:
                due = self._ordered(idx, due, ask)
            if rules.limited(ask.limits):
                claims = self._limited(ask, idx, fixed, due)
            else:
                claims = Claims(self._take(ask, fixed, due, ask.limit))
            if fixed != idx:  # raising entries after run.json is safe
                self._files.replace(self._qdir / "index.json", orjson.dumps(fixed))
            return claims

    def _ordered(self, idx: dict[str, Entry], due: list[str], ask: Ask) -> list[str]:
        """``due`` in the shared claim order, applied to the index's fields."""
        order = rules.claim_order(ask.limits)
        stub = RunRecord(
            run_id="", workflow="", queue=ask.queue, status=RunStatus.PENDING, created_at=0.0
        )

        def key(rid: str) -> tuple[object, ...]:
            e = idx[rid]
            return order(
                stub.evolve(run_id=rid, due_at=e[0], created_at=e[3], priority=priority(e))
            )

        return sorted(due, key=key)

    def _take(self, ask: Ask, fixed: dict[str, Entry], due: list[str], limit: int) -> list[Claim]:
        """Claim up to ``limit`` of ``due`` that ``run.json`` says are claimable,
        each under its run's lock; entries that were stale are repaired."""
        claims: list[Claim] = []
        for rid in due:
            if len(claims) >= limit:
                break
            d = self._run_dir(rid)
            if load_state(d) is None:  # left by a create_run that crashed
                fixed.pop(rid, None)
                continue
            with flock(d / "lock"):
                st = load_state(d)
                assert st is not None  # runs are never deleted
                rec = st.rec
                if rules.claimable(rec, ask.queue, ask.wanted, ask.now):
                    rec = rules.claimed(rec, owner=ask.owner, lease_seconds=ask.lease, now=ask.now)
                    self._files.replace(d / "run.json", dump(replace(st, rec=rec)))
                    claims.append(Claim(run_id=rid, token=rec.lease_token))
                self._repair(fixed, rid, rec, ask.queue)
        return claims

    @staticmethod
    def _repair(fixed: dict[str, Entry], rid: str, rec: RunRecord, queue: str) -> None:
        """Set the entry of ``rid`` to what its committed ``run.json`` says."""
        e = entry(rec) if rec.queue == queue else None
        if e is None:
            fixed.pop(rid, None)
        else:
            fixed[rid] = e  # the truth, also for stale entries we skipped

    def _limited(
        self, ask: Ask, idx: dict[str, Entry], fixed: dict[str, Entry], due: list[str]
    ) -> Claims:
        """Decide which of ``due`` the limits admit (lock-free reads: under the queue
        lock no run's slot or claimability changes), record their starts, then
        claim them."""
        lim, now = ask.limits or QueueLimits(), ask.now
        busy = self._busy(ask, idx, fixed) if lim.concurrency is not None else {}
        window = self._starts(lim, now) if lim.rate is not None else []
        gate = rules.LimitGate(lim, busy=busy, starts=window, now=now)
        picked: list[str] = []
        new_starts = 0
        for rid in due:
            if len(picked) >= ask.limit:
                break
            e = idx[rid]
            if lim.concurrency is not None and busy.get(slot_key(e), 0) >= lim.concurrency:
                continue  # its group is full: the gate would refuse it, unread
            if gate.held_until is not None and not started(e):
                continue  # the window is full for every run that never started
            st = load_state(self._run_dir(rid))
            if st is None:  # left by a create_run that crashed
                fixed.pop(rid, None)
                continue
            rec = st.rec
            if not rules.claimable(rec, ask.queue, ask.wanted, now):
                if rules.holds_slot(rec, ask.queue, now) and gate.admit(
                    rec.concurrency_key, started=True
                ):  # a claim that crashed before its entry: its slot counts
                    busy[rec.concurrency_key] = busy.get(rec.concurrency_key, 0) + 1
                self._repair(fixed, rid, rec, ask.queue)
                continue
            first = rec.started_at is None
            if gate.admit(rec.concurrency_key, started=not first):
                picked.append(rid)
                busy[rec.concurrency_key] = busy.get(rec.concurrency_key, 0) + 1
                new_starts += first
            else:
                self._repair(fixed, rid, rec, ask.queue)
        if new_starts:  # before the claims: a crash leaves a start too many, not too few
            self._files.replace(self._qdir / STARTS, orjson.dumps(window + [now] * new_starts))
        claims = Claims(self._take(ask, fixed, picked, len(picked)))
        claims.held_until = gate.held_until
        return claims

    def _busy(
        self, ask: Ask, idx: dict[str, Entry], fixed: dict[str, Entry]
    ) -> dict[str | None, int]:
        """The live leases of the queue per concurrency key, every workflow's. A
        leased run is always indexed (it is due), and its indexed lease is never
        above the real one; one at or before ``now`` is checked in ``run.json``
        (a renew may have extended it) and repaired in the index."""
        busy: dict[str | None, int] = {}
        for rid, e in idx.items():
            if e[1] is None:
                continue
            if e[1] > ask.now:
                key = slot_key(e)
            else:
                st = load_state(self._run_dir(rid))
                if st is None or not rules.holds_slot(st.rec, ask.queue, ask.now):
                    continue
                self._repair(fixed, rid, st.rec, ask.queue)
                key = st.rec.concurrency_key
            busy[key] = busy.get(key, 0) + 1
        return busy

    def _starts(self, lim: QueueLimits, now: float) -> list[float]:
        """The queue's recorded first claims in the rate's window."""
        try:
            raw: list[float] = orjson.loads((self._qdir / STARTS).read_bytes())
        except FileNotFoundError:
            return []
        return [s for s in raw if s > now - lim.period]
