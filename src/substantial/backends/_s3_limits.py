"""Claims under queue limits (:class:`QueueLimits`) on the S3 store: concurrency slots
and a start rate that hold across processes with no multi-object transaction, and
priority order (the design of the store is in ``s3``, the plain claim in ``_s3_claim``).

Each limited queue has one coordination object, ``limits/<queue>.json``
(``_s3_layout.LimitDoc``), only ever replaced with ``If-Match`` on its ETag (created
with ``If-None-Match: *``). It holds the **slot holders** (run id -> concurrency key,
the lease token its limited claim took, when that lease ends) and the **starts** (the
times of the queue's recent first claims). A limited claim pass:

1. reads it and *settles* the holders it will count: one whose lease end passed stays
   only if its run object still holds that lease (a renewal: its end is refreshed),
   and a group that would hold a candidate back has its holders' run objects read, so
   a slot released or ended (a release never touches this object) comes back at once;
2. takes the due candidates in ``rules.claim_order`` through ``rules.LimitGate`` (the
   busy slots: the settled holders; the starts: the object's, in the rate's window);
3. replaces the object with a reservation for each admitted run (its key, the token
   its claim will take, its lease end) and its start: the commit point. A failed
   condition means another claimer came first: read again, settle again, retry with
   backoff, within the pass's time budget (a quarter lease, ``Want.deadline``);
4. claims each reserved run the usual way (fence, run object: ``_s3_claim``), only
   with the token it reserved.

Why no two claimers together exceed a limit: every admission is computed from the
version of the object that it replaces, so admissions are serialised by the ETag;
and a holder leaves the object only once a read of its run object shows that lease
over (released, ended, expired), or, for a reservation whose claim has not landed
(in flight, or failed), once the lease it would have taken has ended. So an in-flight
or failed claim keeps its slot (conservative, never over-admits); a claim that fails
gives its reservation and start back at once, best effort. A rate alone keeps
reservations only for first claims, and only to tell racing claimers which runs are
being taken; they lapse with their lease end.

Cost, beyond the plain claim: a LIST per 1,000 due runs (claim order is not key
order, so every due run is a candidate); a GET and a conditional PUT of this object
per pass that admits a run (a retry per race lost); a GET per holder of a group that
would hold a candidate back (a holder seen leased is trusted for ``_LIVE_TTL``); and
a GET per due run never seen before: a run's fixed fields (concurrency key, priority,
creation) are remembered, and so, while its due entry stays where it was, whether it
has started; a run that a full group or a full window holds back in any case is not
read again. Unlimited claims never come here. Runs claimed with no limits (a worker
not configured with the queue's limits) are not counted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .._types import RunStatus
from . import _rules as rules
from ._protocol import Claim, Claims, QueueLimits, RunRecord
from ._s3_claim import KEY_RESOLUTION, Want
from ._s3_claim import Claims as ClaimPasses
from ._s3_client import Bucket, Listed
from ._s3_layout import (
    DueEntry,
    Keys,
    LimitDoc,
    RunDoc,
    Slot,
    dump_limits,
    load_limits,
    parse_due,
)
from ._s3_log import PARALLEL, each, new_nonce

_LIVE_TTL = 1.0  # seconds a holder read as leased counts without a new read
_SEEN_MAX = 65536  # runs whose fixed fields are remembered
_PAGE = 1000  # due-index keys per LIST
_GIVE_BACK_TRIES = 5
_SKEW = 1.0  # seconds of clock skew between claimers a start outlives its window by


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a read of a claimable run object told: the fields that never change, and,
    while its due entry is still at ``stamp``, its due time and whether it started."""

    stamp: str
    key: str | None
    priority: int
    created_at: float
    due_at: float | None
    started: bool


@dataclass(frozen=True, slots=True)
class _Cand:
    """A due run of the wanted workflows: read this pass (``doc``), or made of what an
    earlier read told (``doc`` None: read it before claiming it)."""

    entry: DueEntry
    listed: Listed
    rec: RunRecord  # the run object's record, or one made of the remembered fields
    doc: RunDoc | None
    started: bool


@dataclass(frozen=True, slots=True)
class _Plan:
    """A pass's decision against one version of the coordination object."""

    admitted: list[tuple[_Cand, bool]]  # in claim order; True: reserved in the object
    holders: dict[str, Slot]
    starts: list[float]
    held_until: float | None

    @property
    def reserves(self) -> bool:
        return any(reserved for _, reserved in self.admitted)


async def _backoff(tries: int) -> None:
    await asyncio.sleep(min(0.005 * 2**tries, 0.1) * (0.5 + random.random()))


class LimitedClaims:
    """The claim passes of one S3 store that obey limits or order by priority. It
    claims through ``passes`` (the plain claim's fence and write); ``fetch`` reads a
    run object."""

    def __init__(
        self,
        passes: ClaimPasses,
        bucket: Bucket,
        keys: Keys,
        fetch: Callable[[str], Awaitable[RunDoc | None]],
    ) -> None:
        self._passes = passes
        self._bucket = bucket
        self._keys = keys
        self._fetch = fetch
        self._seen: dict[str, _Seen] = {}
        self._live: dict[str, tuple[int, float, float]] = {}  # run -> token, lease end, read at

    def forget(self, run_id: str) -> None:
        """This process dropped the run's lease: its slot is no longer known held."""
        self._live.pop(run_id, None)

    async def claim_due(self, want: Want, limit: int, limits: QueueLimits) -> Claims:
        stop = want.deadline()
        if limit <= 0:
            return Claims()
        doc = await self._read(want.queue) if rules.limited(limits) else None
        found = await self._candidates(want, stop)
        order = rules.claim_order(limits)
        found.sort(key=lambda c: order(c.rec))
        cands: list[_Cand | None] = list(found)
        if doc is None:  # priority alone: no limit to coordinate
            return Claims(await self._claim_in_order(cands, want, limit, stop))
        return await self._claim_limited(doc, cands, want, limit, limits, stop)

    # -- candidates ---------------------------------------------------------------------

    async def _candidates(self, want: Want, stop: float) -> list[_Cand]:
        """Every due entry of the wanted workflows as a candidate (all of them: claim
        order is not key order). A run not seen before is read now, as its fields
        decide its place; the others are made of what was seen, and read if taken."""
        found: dict[str, _Cand] = {}
        unseen: list[tuple[DueEntry, Listed]] = []
        after: str | None = None
        while True:
            page = await self._bucket.list(self._keys.queue(want.queue), after=after, limit=_PAGE)
            entries = [(e, o) for e, o in ((parse_due(o.key), o) for o in page) if e is not None]
            due = [(e, o) for e, o in entries if e.at <= want.now + KEY_RESOLUTION]
            for e, o in due:
                if e.workflow not in want.workflows:
                    continue
                seen = self._seen.get(e.run_id)
                if seen is not None and seen.stamp == e.stamp:
                    found[e.run_id] = _remembered(e, o, seen, want.queue)
                else:  # never seen, or moved since (a claim, a release): its time may be a lease's
                    unseen.append((e, o))
            if len(due) < len(entries) or len(page) < _PAGE or time.monotonic() >= stop:
                break
            after = page[-1].key
        step = 4 * PARALLEL
        for i in range(0, len(unseen), step):
            if time.monotonic() >= stop:
                break
            got = await each(unseen[i : i + step], lambda eo: self._look(eo[0], eo[1], want))
            found.update((c.rec.run_id, c) for c in got if c is not None)
        return list(found.values())

    async def _look(self, entry: DueEntry, listed: Listed, want: Want) -> _Cand | None:
        """Read the run of a due entry: a candidate if it is claimable (else None, the
        index tidied as the plain claim does)."""
        doc = await self._passes.due_doc(entry, listed, want)
        if doc is None:
            return None
        rec = doc.rec
        if len(self._seen) >= _SEEN_MAX:
            for old in list(self._seen)[: _SEEN_MAX // 2]:
                del self._seen[old]
        self._seen.pop(rec.run_id, None)
        started = rec.started_at is not None
        self._seen[rec.run_id] = _Seen(
            entry.stamp, rec.concurrency_key, rec.priority, rec.created_at, rec.due_at, started
        )
        return _Cand(entry, listed, rec, doc, started)

    async def _read_all(self, cands: list[_Cand | None], picks: list[int], want: Want) -> None:
        """Read the remembered candidates at ``picks``: each becomes read, or None."""

        async def one(i: int) -> _Cand | None:
            c = cands[i]
            return None if c is None else await self._look(c.entry, c.listed, want)

        for i, c in zip(picks, await each(picks, one), strict=True):
            cands[i] = c

    async def _claim(self, c: _Cand, want: Want, token: int | None) -> Claim | None:
        """Claim a candidate from its run object read again (the candidate's may be a
        pass old: a stale view only fails the conditions, but costs the holder of a
        newer lease its fence), if it is still claimable (with ``token``: as reserved)."""
        doc = await self._fetch(c.rec.run_id)
        if doc is None or not want.claimable(doc.rec):
            return None
        if token is not None and doc.rec.lease_token + 1 != token:
            return None
        return await self._passes.claim_doc(doc, want, token=token)

    async def _claim_in_order(
        self, cands: list[_Cand | None], want: Want, limit: int, stop: float
    ) -> list[Claim]:
        """Priority alone: claim in claim order, a batch at a time, as the plain claim."""
        claims: list[Claim] = []
        rest = [c for c in cands if c is not None]
        while rest and len(claims) < limit and time.monotonic() < stop:
            size = min(limit - len(claims), PARALLEL)
            batch, rest = rest[:size], rest[size:]
            got = await each(batch, lambda c: self._claim(c, want, None))
            claims.extend(c for c in got if c is not None)
        return claims

    # -- the coordination object --------------------------------------------------------

    async def _read(self, queue: str) -> LimitDoc:
        got = await self._bucket.get(self._keys.limits(queue))
        return LimitDoc({}, []) if got is None else load_limits(*got)

    async def _replace(
        self, queue: str, doc: LimitDoc, holders: dict[str, Slot], starts: list[float]
    ) -> tuple[bool, LimitDoc | None]:
        """Replace ``doc`` (its ETag the condition): True, or False and the version
        that came first."""
        nonce = new_nonce()
        body = dump_limits(holders, starts, nonce)
        key = self._keys.limits(queue)
        if doc.etag is None:
            etag = await self._bucket.put(key, body, if_absent=True)
        else:
            etag = await self._bucket.put(key, body, if_match=doc.etag)
        if etag is not None:
            return True, None
        latest = await self._read(queue)
        return latest.nonce == nonce, latest  # our own write, its reply lost: done

    async def _claim_limited(
        self,
        doc: LimitDoc,
        cands: list[_Cand | None],
        want: Want,
        limit: int,
        limits: QueueLimits,
        stop: float,
    ) -> Claims:
        checked: dict[tuple[str, int], Slot | None] = {}  # this pass's reads of holders
        tries = 0
        while True:
            plan = await self._plan(doc, cands, want, limit, limits, checked, stop)
            if not plan.reserves:
                if plan.holders != doc.holders:  # tidied: spare the next pass the reads
                    await self._replace(want.queue, doc, plan.holders, plan.starts)
                break
            done, latest = await self._replace(want.queue, doc, plan.holders, plan.starts)
            if done:
                break
            if time.monotonic() >= stop:
                return Claims()
            await _backoff(tries)
            tries += 1
            doc = latest if latest is not None else await self._read(want.queue)
        got = await each(
            plan.admitted, lambda cr: self._claim(cr[0], want, cr[0].rec.lease_token + 1)
        )
        lost = [
            (c.rec.run_id, c.rec.lease_token + 1, c.rec.started_at is None)
            for (c, reserved), claim in zip(plan.admitted, got, strict=True)
            if claim is None and reserved
        ]
        if lost:
            await self._give_back(want.queue, lost, limits.rate is not None, want.now)
        return Claims([c for c in got if c is not None], held_until=plan.held_until)

    async def _give_back(
        self, queue: str, lost: list[tuple[str, int, bool]], rated: bool, now: float
    ) -> None:
        """Drop the reservations (and starts) of claims that did not land, if still
        there; best effort: one left behind lapses with its lease end."""
        for tries in range(_GIVE_BACK_TRIES):
            doc = await self._read(queue)
            holders, starts = dict(doc.holders), list(doc.starts)
            for run_id, token, first in lost:
                slot = holders.get(run_id)
                if slot is not None and slot.token == token:
                    del holders[run_id]
                    if rated and first and now in starts:
                        starts.remove(now)
            if holders == doc.holders or (await self._replace(queue, doc, holders, starts))[0]:
                return
            await _backoff(tries)

    # -- settling and admitting ---------------------------------------------------------

    async def _plan(
        self,
        doc: LimitDoc,
        cands: list[_Cand | None],
        want: Want,
        limit: int,
        limits: QueueLimits,
        checked: dict[tuple[str, int], Slot | None],
        stop: float,
    ) -> _Plan:
        now, conc, rate = want.now, limits.concurrency, limits.rate
        holders = dict(doc.holders)
        # 1. a lease end passed: the holder stays only if its run still holds the lease
        #    (renewed); under a rate alone a reservation only marks a claim in flight
        ended = [run_id for run_id, slot in holders.items() if slot.until <= now]
        if conc is None:
            for run_id in ended:
                del holders[run_id]
        else:
            await self._settle(holders, ended, want, checked)
        # 2. a claimable candidate's own reservation is over: read the remembered ones
        await self._read_all(
            cands,
            [
                i
                for i, c in enumerate(cands)
                if c is not None and c.doc is None and c.rec.run_id in holders
            ],
            want,
        )
        for c in cands:
            if c is not None and c.doc is not None:
                slot = holders.get(c.rec.run_id)
                if slot is not None and c.rec.lease_token >= slot.token:
                    del holders[c.rec.run_id]
        # 3. a group that would hold a candidate back: are its holders still leased?
        if conc is not None:
            busy = Counter(slot.key for slot in holders.values())
            wanting = Counter(
                c.rec.concurrency_key
                for c in cands
                if c is not None and c.rec.run_id not in holders
            )
            doubtful = [
                run_id
                for run_id, slot in holders.items()
                if wanting[slot.key] and busy[slot.key] + wanting[slot.key] > conc
            ]
            await self._settle(holders, doubtful, want, checked)
        # a start stays past its window a pass's time budget more: a claimer whose
        # ``now`` is older (its pass began earlier) still counts it
        keep = now - limits.period - want.budget - _SKEW
        starts = sorted(s for s in doc.starts if s > keep) if rate else doc.starts
        gate = rules.LimitGate(
            limits, busy=Counter(slot.key for slot in holders.values()), starts=starts, now=now
        )
        begun = sum(1 for s in starts if s > now - limits.period)
        admitted = await self._walk(gate, cands, holders, begun, want, limit, limits, stop)
        new_holders, new_starts = dict(holders), list(starts)
        out: list[tuple[_Cand, bool]] = []
        for c in admitted:
            first = c.rec.started_at is None
            reserve = conc is not None or (rate is not None and first)
            if reserve:
                token = c.rec.lease_token + 1
                new_holders[c.rec.run_id] = Slot(
                    c.rec.concurrency_key, token, now + want.lease_seconds
                )
            if rate is not None and first:
                new_starts.append(now)
            out.append((c, reserve))
        return _Plan(out, new_holders, sorted(new_starts), gate.held_until)

    async def _walk(
        self,
        gate: rules.LimitGate,
        cands: list[_Cand | None],
        holders: dict[str, Slot],
        begun: int,
        want: Want,
        limit: int,
        limits: QueueLimits,
        stop: float,
    ) -> list[_Cand]:
        """The candidates ``gate`` admits, in claim order, up to ``limit``. A remembered
        candidate is read only when it reaches the gate with a chance of passing: a
        full group, or a full window for a run known never started, holds it back
        whatever its run object says (``used`` and ``begun`` mirror the gate's count)."""
        conc, rate = limits.concurrency, limits.rate
        used: Counter[str | None] = Counter(slot.key for slot in holders.values())

        def admit(key: str | None, started: bool) -> bool:
            nonlocal begun
            if not gate.admit(key, started=started):
                return False
            used[key] += 1
            if rate is not None and not started:
                begun += 1
            return True

        def full(c: _Cand) -> bool:
            """Its group is full: the gate holds it back whatever its run object says."""
            return conc is not None and used[c.rec.concurrency_key] >= conc

        def timed(c: _Cand) -> bool:
            """It never started and the window is full: the rate holds it back."""
            return rate is not None and not c.started and begun >= rate

        admitted: list[_Cand] = []
        i = 0
        while i < len(cands) and len(admitted) < limit:
            c = cands[i]
            if c is None or c.rec.run_id in holders:  # reserved by a claim in flight
                i += 1
                continue
            if c.doc is None:
                if full(c) or timed(c):
                    if not full(c):
                        admit(c.rec.concurrency_key, False)  # refused: notes when it frees
                    i += 1
                    continue
                if time.monotonic() >= stop:
                    break
                picks = [i]
                for j in range(i + 1, len(cands)):
                    if len(picks) >= PARALLEL:
                        break
                    d = cands[j]
                    if (
                        d is not None
                        and d.doc is None
                        and d.rec.run_id not in holders
                        and not (full(d) or timed(d))
                    ):
                        picks.append(j)
                await self._read_all(cands, picks, want)
                continue  # look at position i again, read
            if admit(c.rec.concurrency_key, c.rec.started_at is not None):
                admitted.append(c)
            i += 1
        return admitted

    async def _settle(
        self,
        holders: dict[str, Slot],
        run_ids: list[str],
        want: Want,
        checked: dict[tuple[str, int], Slot | None],
    ) -> None:
        """Check the holders ``run_ids`` against their run objects: each stays (its
        lease refreshed) or goes."""
        todo = [(run_id, holders[run_id]) for run_id in run_ids if run_id in holders]

        async def one(item: tuple[str, Slot]) -> Slot | None:
            run_id, slot = item
            if (run_id, slot.token) not in checked:
                checked[run_id, slot.token] = await self._holds(run_id, slot, want)
            return checked[run_id, slot.token]

        for (run_id, _), slot in zip(todo, await each(todo, one), strict=True):
            if slot is None:
                del holders[run_id]
            else:
                holders[run_id] = slot

    async def _holds(self, run_id: str, slot: Slot, want: Want) -> Slot | None:
        """The holder's slot as its run object tells: still leased by that claim or a
        later one (refreshed), a claim not landed whose lease would not have ended
        (kept as it is), or over (None)."""
        now = time.monotonic()
        hit = self._live.get(run_id)
        if (
            hit is not None
            and hit[0] >= slot.token
            and hit[1] > want.now
            and now - hit[2] < _LIVE_TTL
        ):
            return Slot(slot.key, hit[0], hit[1])
        if len(self._live) > _SEEN_MAX:
            self._live = {k: v for k, v in self._live.items() if now - v[2] < _LIVE_TTL}
        doc = await self._fetch(run_id)
        if doc is None:
            return None
        rec = doc.rec
        if (
            rec.lease_token >= slot.token
            and rules.holds_slot(rec, want.queue, want.now)
            and rec.lease_expires_at is not None
        ):
            self._live[run_id] = (rec.lease_token, rec.lease_expires_at, now)
            return Slot(rec.concurrency_key, rec.lease_token, rec.lease_expires_at)
        self._live.pop(run_id, None)
        if rec.lease_token < slot.token and slot.until > want.now:
            return slot  # its claim is in flight, or failed: held until its lease would end
        return None


def _remembered(entry: DueEntry, listed: Listed, seen: _Seen, queue: str) -> _Cand:
    """A candidate made of what a read told, its entry not moved since (a claim, a
    release, a renewal's move all move it): the run is as it was then, or leased."""
    rec = RunRecord(
        run_id=entry.run_id,
        workflow=entry.workflow,
        queue=queue,
        status=RunStatus.PENDING,
        created_at=seen.created_at,
        due_at=seen.due_at,
        priority=seen.priority,
        concurrency_key=seen.key,
    )
    return _Cand(entry, listed, rec, None, seen.started)
