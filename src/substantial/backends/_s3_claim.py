"""The claim pass of the S3 store: list the due index up to now and claim the due runs
of the wanted workflows, each with the next lease token (the design is in ``s3``).

Why a claim is safe, in the terms of ``s3``'s module docstring:

* **The fence, then the run object.** A claim reserves the log's next position with a
  fence naming its new token (*Fencing*), then writes that token into the run object
  with ``If-Match`` on its ETag (*The run object is a view of the log*). Of two
  claimers one loses the fence or the condition; a writer with the older token finds
  its next position taken.
* **Roll forward.** The claim reads the log's last object to place its fence; an update
  there that its writer died before writing into the run object is applied first
  (*roll forward*), so the run is claimed, or not, as if that writer had lived.
* **The due index is never later than the truth**, so a scan up to now misses no due
  run. It trusts no entry: each is re-checked against its run object; an early one is
  moved, a stray one removed as that section says, and one whose run object is missing
  (a create that died) only after ``_ORPHAN_AGE``, with ``If-Match`` on its ETag.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from . import _rules as rules
from ._hub import LocalHub
from ._protocol import Claim, RunRecord
from ._s3_client import Bucket, Listed
from ._s3_layout import DueEntry, Keys, RunDoc, parse_due, time_key, wake_at
from ._s3_log import PARALLEL, Moved, RunLogs, Scan, each

KEY_RESOLUTION = 1e-6  # seconds: the due index's keys are rounded to this
_ORPHAN_AGE = 60.0  # a due entry whose run object is missing this long: a create that died
MIN_PASS = 0.5  # ... but always runs this long, so a pass makes progress


class WriteRun(Protocol):
    """The store's write of a run object (``S3Backend._write``): None if another writer
    came first."""

    def __call__(
        self, old: RunDoc, rec: RunRecord, *, gen: str = ...
    ) -> Awaitable[RunDoc | None]: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Want:
    """What one claim pass takes: runs of ``queue`` and ``workflows``, for ``owner``."""

    queue: str
    workflows: set[str]
    owner: str
    lease_seconds: float
    now: float

    def claimable(self, rec: RunRecord) -> bool:
        return rules.claimable(rec, self.queue, self.workflows, self.now)

    def claimed(self, rec: RunRecord, log_len: int) -> RunRecord:
        return rules.claimed(
            rec.evolve(log_len=log_len),
            owner=self.owner,
            lease_seconds=self.lease_seconds,
            now=self.now,
        )

    @property
    def budget(self) -> float:
        """How long a pass may start new work: a quarter lease, as the runs it claimed
        first wait for it to return before anything renews them (the next pass takes
        the rest)."""
        return max(self.lease_seconds / 4, MIN_PASS)

    def deadline(self) -> float:
        """When a pass begun now starts nothing more (``time.monotonic``)."""
        return time.monotonic() + self.budget


class Claims:
    """The claim passes of one S3 store. It keeps nothing of its own: a claim leaves
    the run's tail with ``logs`` and its run object in ``held`` (the store's record of
    the runs it holds); ``fetch`` reads a run object, ``write`` replaces one."""

    def __init__(
        self,
        bucket: Bucket,
        keys: Keys,
        logs: RunLogs,
        hub: LocalHub,
        *,
        fetch: Callable[[str], Awaitable[RunDoc | None]],
        write: WriteRun,
        held: dict[str, RunDoc],
    ) -> None:
        self._bucket = bucket
        self._keys = keys
        self._logs = logs
        self._hub = hub
        self._fetch = fetch
        self._write = write
        self._held = held

    async def claim_due(self, want: Want, limit: int) -> list[Claim]:
        """An unlimited claim: the due runs in index order (see the module docstring)."""
        claims: list[Claim] = []
        after: str | None = None
        stop = want.deadline()
        while len(claims) < limit and time.monotonic() < stop:
            page = await self._bucket.list(self._keys.queue(want.queue), after=after, limit=100)
            entries = [e for e in map(parse_due, (o.key for o in page)) if e is not None]
            # a key holds its time to the microsecond, rounded: one a rounding put
            # just past ``now`` may be due (the run object's own time decides)
            due = [e for e in entries if e.at <= want.now + KEY_RESOLUTION]
            seen = {o.key: o for o in page}
            mine = [e for e in due if e.workflow in want.workflows]
            while mine and len(claims) < limit and time.monotonic() < stop:
                size = min(limit - len(claims), PARALLEL)
                batch, mine = mine[:size], mine[size:]
                got = await each(
                    [(e, seen[e.key]) for e in batch],
                    lambda el: self._claim_one(el[0], el[1], want),
                )
                claims.extend(c for c in got if c is not None)
            if len(due) < len(entries) or len(page) < 100:
                break
            after = page[-1].key
        return claims

    async def _claim_one(self, entry: DueEntry, listed: Listed, want: Want) -> Claim | None:
        """Claim the run of one due entry, or None: fence the log's end with the next
        lease token, then write that token into the run object."""
        doc = await self.due_doc(entry, listed, want)
        return None if doc is None else await self.claim_doc(doc, want)

    async def claim_doc(self, doc: RunDoc, want: Want, *, token: int | None = None) -> Claim | None:
        """Claim the run of a claimable run object ``doc`` (it may be stale: the fence
        and the run object's condition decide), or None. ``token``: only with this
        lease token (the one a limited claim reserved a slot for)."""
        run_id = doc.rec.run_id
        try:
            scan = await self._logs.scan(run_id, doc.gen)
        except Moved:
            return None
        rolled = await self._rolled_forward(doc, scan, want)
        if rolled is None:
            return None
        next_token = rolled.rec.lease_token + 1
        if token is not None and next_token != token:
            return None  # claimed by another since the reservation
        last = scan.last
        if last is not None and (
            last.token > next_token or (last.token == next_token and not last.fence)
        ):
            # a newer lease wrote the log: ``doc`` is stale (a fresh one never shows
            # this), and a fence of ours would knock that holder out
            return None
        if last is not None and last.fence and last.token == next_token:
            # a fence of the token we would take: a claim that died after placing it,
            # or one that won and whose run object ``doc`` predates. Replacing the
            # winner's fence costs it a request at its first append, so look first
            fresh = await self._fetch(run_id)
            if fresh is None or fresh.rec.lease_token >= next_token:
                return None
        fence = await self._logs.fence(run_id, scan, next_token)
        if fence is None:
            return None  # a writer or another claimer got there first
        return await self._take(rolled, scan, next_token, fence, want)

    async def due_doc(self, entry: DueEntry, listed: Listed, want: Want) -> RunDoc | None:
        """The run object of a due entry if the run is claimable; else None, after
        tidying the index (a create that died, a stray entry, an early one)."""
        doc = await self._fetch(entry.run_id)
        if doc is None:
            if time.time() - listed.modified > _ORPHAN_AGE:
                await self._bucket.delete(entry.key, if_match=listed.etag)  # a create that died
            return None
        if doc.indexed != entry.stamp:
            await self._drop_stray(listed, doc)
            return None
        if not want.claimable(doc.rec):
            wake = wake_at(doc.rec)
            if wake is None or time_key(wake) != doc.indexed:
                await self._write(doc, doc.rec)  # an early entry (a renewed lease): move it
            return None
        return doc

    async def _rolled_forward(self, doc: RunDoc, scan: Scan, want: Want) -> RunDoc | None:
        """The run object with the update of the log's last object applied, if its
        writer died before writing it there (*roll forward*, see the module docstring);
        None if the run is not to be claimed now after all."""
        rec, last = doc.rec, scan.last
        if last is None or last.update is None or last.end <= rec.log_len:
            return doc
        if last.token != rec.lease_token:
            return None
        rolled, _ = rules.appended(
            rec, last.update, log_len=scan.end, last_inbox_id=doc.last_inbox_id, now=want.now
        )
        written = await self._write(doc, rolled, gen=scan.gen)
        if written is None:
            return None
        if rules.ends_lease(last.update):
            self._hub.publish(rec.run_id)
        return written if want.claimable(rolled) else None

    async def _take(
        self, doc: RunDoc, scan: Scan, token: int, fence: str, want: Want
    ) -> Claim | None:
        """Write the claim into the run object, its log fenced already: retried when a
        delivery or a cancel came first, as long as the run stays claimable."""
        run_id, before = doc.rec.run_id, doc.rec.lease_token
        claimed = want.claimed(doc.rec, scan.end)
        for _ in range(3):
            written = await self._write(doc, claimed, gen=scan.gen)
            if written is not None:
                self._logs.hold(run_id, token, scan, fence)
                self._held[run_id] = written
                return Claim(run_id=run_id, token=token)
            latest = await self._fetch(run_id)  # a delivery or cancel came first?
            if latest is None or latest.rec.lease_token != before:
                return None
            if not want.claimable(latest.rec):
                return None
            doc = latest
            claimed = want.claimed(latest.rec, scan.end)
        return None

    async def _drop_stray(self, entry: Listed, doc: RunDoc) -> None:
        """Remove an index entry its run object does not name: first a no-op write of
        the run object (a writer placing that entry right now then fails and places it
        again), then the entry itself, only if it is still the one we listed."""
        if await self._write(doc, doc.rec) is not None:
            await self._bucket.delete(entry.key, if_match=entry.etag)
