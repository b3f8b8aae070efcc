"""A worker's hold on one run: the decoded log, fenced appends, the inbox transfer.

The journal opens a session when a worker claims a run; the engine reads the
log and writes through it, and only through it. The session owns its state
(the lease it holds, whether it was lost or released): callers ask it to
append, suspend, finish or hand back, never set its flags.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson

from . import _records as R
from ._records import decode_record
from ._types import RunStatus
from .backends import Append, Claim, RunRecord, RunUpdate, Snapshot
from .errors import BackendError, CorruptRecord, LeaseLost, RunNotFound

if TYPE_CHECKING:
    from ._journal import Journal

log = logging.getLogger("substantial._journal")


@dataclass(frozen=True, slots=True)
class RunEnd:
    """How a run ended: the fields of its row that ``result()`` reads. A session
    makes one from the end it made durable, so this process's waiters need not
    read the row back; a store's row makes one too (:meth:`of`)."""

    run_id: str
    status: RunStatus
    result: Any = None  # JSON form, as the store holds it
    error: str | None = None
    error_type: str | None = None

    @classmethod
    def of(cls, run: RunRecord) -> RunEnd:
        return cls(run.run_id, run.status, run.result, run.error, run.error_type)


class RunSession:
    """One worker's hold on one run: decoded log, fenced appends, inbox transfer.

    ``lost`` turns true when the store says another worker owns the run (or it
    became unreachable); after that the session never writes again.
    """

    def __init__(self, journal: Journal, claim: Claim, run: RunRecord, lease: float) -> None:
        self.journal = journal
        self.run_id = claim.run_id
        self.token = claim.token
        self.run = run
        self.lease = lease
        self.records: list[R.Record] = []
        self.corrupt: CorruptRecord | None = None
        self.lost: BaseException | None = None
        self.released = False  # ended or handed back: the lease is no longer ours
        self._changed = asyncio.Event()
        self._dirty = True  # the inbox may hold items: pull before acting
        self._shown = RunStatus.RUNNING  # the status the store shows (a claim sets RUNNING)
        # Events moved from the inbox but not yet in the store: the last ``_staged``
        # of ``records``. Their positions are fixed already; they are written with
        # the next append (with ``inbox_pos = _staged_inbox``), so taking an event
        # in costs no round trip of its own (see ``pull``).
        self._staged = 0
        self._staged_inbox: int | None = None
        self._outcomes: set[str] | None = None  # child outcomes in the log, once one comes

    @classmethod
    def loaded(cls, journal: Journal, claim: Claim, snap: Snapshot, lease: float) -> RunSession:
        """A session over ``snap``, the claimed run's first read."""
        session = cls(journal, claim, snap.run, lease)
        session.load(snap.log)
        if not snap.inbox:
            session._dirty = False  # this read saw the inbox empty: no need to read again
        return session

    def lease_lost(self) -> None:
        """The worker learnt (from a renewal) that another worker owns the run:
        never write again."""
        if self.lost is None:
            self.lost = LeaseLost(self.run_id)

    # -- loading -------------------------------------------------------------

    def load(self, raw: Sequence[bytes]) -> None:
        for i, data in enumerate(raw):
            try:
                self.records.append(decode_record(self.run_id, i, data))
            except CorruptRecord as exc:
                self.corrupt = exc
                self.records.append({"k": "corrupt"})

    @property
    def start(self) -> R.Record:
        return self.records[0]

    # -- writes -------------------------------------------------------------

    async def append(
        self, recs: Sequence[R.Record], update: RunUpdate | None = None, what: str = "record"
    ) -> int:
        """Append records (after any staged events); returns the log position of
        the first of ``recs``. Fenced."""
        if self.lost is not None:
            raise self.lost
        encode = self.journal.encode
        encoded = [encode(r, what) for r in recs]
        if self._staged:
            staged = self.records[len(self.records) - self._staged :]
            encoded[:0] = [encode(r, "event") for r in staged]
        if self._staged_inbox is not None:
            moved = RunUpdate(inbox_pos=self._staged_inbox)
            update = moved if update is None else replace(update, inbox_pos=self._staged_inbox)
        published = {r["name"]: r.get("v") for r in recs if r["k"] == R.STATE}
        if published:  # the store keeps the latest of each key with the run, for search
            update = (
                RunUpdate(state=published) if update is None else replace(update, state=published)
            )
        first = len(self.records)
        try:
            await self.journal.append(
                Append(
                    run_id=self.run_id,
                    token=self.token,
                    expected_len=self.durable_len,
                    records=encoded,
                    update=update,
                    now=self.journal.clock(),
                )
            )
        except BackendError as exc:  # lease lost, or store unreachable: stop writing
            self.lost = exc
            raise
        self.records.extend(recs)
        self._staged, self._staged_inbox = 0, None
        if update is not None and update.status is not None:
            self._shown = update.status
        return first

    @property
    def durable_len(self) -> int:
        """How many of ``records`` the store holds (the rest are staged events)."""
        return len(self.records) - self._staged

    async def _write_staged(self) -> None:
        if self._staged or self._staged_inbox is not None:
            await self.append([], None, "event")

    def write(
        self, recs: Sequence[R.Record], *, what: str, waiting: bool = False
    ) -> Awaitable[int]:
        """The engine's append of a durable call's records; returns the position of
        the first.

        The status rides along (guarantee 8), so it costs no round trip of its
        own: ``waiting`` records start a wait (an armed timer, a failed attempt's
        backoff), and the store shows SUSPENDED with them while this worker
        keeps the lease; the first write after a wait shows RUNNING again."""
        status = RunStatus.SUSPENDED if waiting else RunStatus.RUNNING
        update = None if status is self._shown else RunUpdate(status=status)
        return self.append(recs, update, what)  # (not a coroutine of its own: hot path)

    @property
    def shown(self) -> RunStatus:
        """The status the store shows for the run (see :meth:`show`)."""
        return self._shown

    @property
    def needs_pull(self) -> bool:
        """The inbox may hold items that :meth:`pull` would take in."""
        return self._dirty

    async def show(self, status: RunStatus) -> None:
        """Make the store show ``status`` (RUNNING or SUSPENDED) if it does not.

        The rare case where no record carries it: a wait that a replay continues
        in place (its record was written before the restart). (Before a save's
        effect the engine writes its held-back records instead: ``_unsettled``.)"""
        if status != self._shown:
            await self.append([], RunUpdate(status=status), "status")

    async def rewrite(self, recs: Sequence[R.Record]) -> None:
        """Replace the whole log (compaction). Fenced like ``append``."""
        if self.lost is not None:
            raise self.lost
        await self._write_staged()  # the rewrite carries no inbox position of its own
        encoded = [self.journal.encode(r, "compacted record") for r in recs]
        try:
            await self.journal.backend.rewrite_log(
                self.run_id,
                token=self.token,
                expected_len=len(self.records),
                records=encoded,
                now=self.journal.clock(),
            )
        except BackendError as exc:
            self.lost = exc
            raise
        self.records = list(recs)

    async def pull(self) -> None:
        """Move pending inbox items into the log: their positions are fixed now,
        and they are written with the next append (any write the run makes next:
        the call that consumes them, the end, a suspension). Should the worker die
        first, the items are still in the inbox and land at the same positions."""
        self._dirty = False
        self._changed.clear()
        snap = await self.journal.backend.read(self.run_id, log_from=self.durable_len)
        if snap is None:
            raise RunNotFound(self.run_id)
        self.run = snap.run
        if snap.log or snap.run.lease_token != self.token:
            self.lost = LeaseLost(self.run_id)
            raise self.lost
        seen = self._staged_inbox
        items = [i for i in snap.inbox if seen is None or i.id > seen]
        if not items:
            return
        events = []
        now = self.journal.clock()  # when the run took them in (the history shows it)
        for item in items:
            try:
                body = orjson.loads(item.data)
                name = str(body["name"])
                if name.startswith(R.CHILD_OUTCOME) and self._logged_before(name):
                    continue  # sent by the child's worker and by the parent: taken in once
                events.append(
                    {"k": R.EVENT, "name": name, "v": body.get("v"), "id": item.id, "t": now}
                )
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("run %s: dropping undecodable inbox item %d", self.run_id, item.id)
        self.records.extend(events)
        self._staged += len(events)
        self._staged_inbox = items[-1].id

    def _logged_before(self, outcome: str) -> bool:
        if self._outcomes is None:
            self._outcomes = R.child_outcomes(self.records)
        seen = outcome in self._outcomes
        self._outcomes.add(outcome)
        return seen

    async def pull_if_needed(self) -> None:
        if self._dirty:
            await self.pull()

    def notify(self) -> None:
        """A hint arrived for this run: an event or a cancel may be waiting."""
        self._dirty = True
        self._changed.set()

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait for a hint (or ``timeout`` seconds); True if something may have changed."""
        if timeout <= 0:
            return self._dirty
        poll = self.journal.backend.poll_interval
        if poll is not None:
            timeout = min(timeout, poll)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can eat a cancel
                await self._changed.wait()
        except TimeoutError:
            if poll is not None:
                self._dirty = True  # no hints across processes: look anyway
                return True
            return False
        return True

    async def finish(
        self,
        status: RunStatus,
        *,
        result: Any = None,
        error: str | None = None,
        error_type: str | None = None,
        traceback: str | None = None,
        extra: Sequence[R.Record] = (),
    ) -> None:
        """Append the end record (after any ``extra`` records) and set the final
        status in one write. A failure keeps its type and ``traceback`` (the
        workflow code's frames) in the end record; the run row gets the type."""
        now = self.journal.clock()
        end: R.Record = {"k": R.END, "status": status.value}
        if status == RunStatus.FAILED:
            end["err"] = {"type": error_type, "msg": error}
            if traceback is not None:
                end["err"]["tb"] = traceback
            update = RunUpdate(
                status=status, error=error or "", error_type=error_type, ended_at=now
            )
        elif error is not None:  # a cancel with its reason (a deadline that passed)
            end["v"] = None
            end["err"] = {"type": error_type, "msg": error}
            update = RunUpdate(
                status=status, result=None, error=error, error_type=error_type, ended_at=now
            )
        else:
            end["v"] = result
            update = RunUpdate(status=status, result=result, ended_at=now)
        await self.append([*extra, end], update, "the run's result")
        self.released = True
        value = update.result if update.has_result else None
        self.journal.run_ended(RunEnd(self.run_id, status, value, update.error, update.error_type))

    async def suspend(self, due: float | None, pending: Sequence[R.Record] = ()) -> None:
        """Give the run back to the store until ``due`` (or its next event), with
        the ``pending`` records (log lines) written in the same step."""
        if self.lost is not None:
            return
        if pending or self._staged or self._staged_inbox is not None:
            update = RunUpdate(status=RunStatus.SUSPENDED, release=True, due_at=due)
            await self.append(pending, update, "log record")
            self.released = True
            return
        self.released = True
        await self.journal.backend.release(
            self.run_id,
            token=self.token,
            due_at=due,
            status=RunStatus.SUSPENDED,
            now=self.journal.clock(),
        )

    async def hand_back(self) -> None:
        """Shutdown: make the run due now for any worker."""
        if self.lost is not None:
            return
        self.released = True
        now = self.journal.clock()
        await self.journal.backend.release(
            self.run_id, token=self.token, due_at=now, status=RunStatus.PENDING, now=now
        )
