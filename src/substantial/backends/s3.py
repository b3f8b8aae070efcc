"""The S3 store (``s3://bucket/prefix?endpoint_url=...&region=...``): an append-only,
fenced log on an object store's conditional writes, with no broker and no server.

The objects and their encoding are in ``_s3_layout``, the reads and writes of the log
in ``_s3_log``, the claim pass in ``_s3_claim`` (under queue limits: ``_s3_limits``);
every request goes through ``_s3_client.Bucket``. Why this is safe with many workers
on many machines:

* **The log is the truth.** An append is one object created at its position with
  ``If-None-Match: *``: of two writers at one position exactly one wins, so the log
  can only grow in one line. A step costs that one conditional PUT.
* **Fencing.** A claim reserves the log's next position with a *fence* object naming
  its new lease token, before it writes that token into the run object. From then on a
  writer with an older token finds its next position taken and gets LeaseLost. The
  new owner's first append replaces the fence (``If-Match`` on the fence's ETag).
  Claimers of the same token that lose the run object to it may have re-placed that
  fence meanwhile; a fence of its own token is its own, so it follows the new ETag. A
  claimer that finds such a fence reads the run object first, so a claim that won
  is left alone.
* **The run object is a view of the log**, replaced with ``If-Match`` on its ETag
  (read, change, write; retried when another writer came first). An append that
  carries a run update (a status, a result, a release) writes its log object first,
  then the run object. If the writer dies in between, its lease expires and the next
  claimer, which reads the log's last object anyway to place its fence, applies the
  update first (*roll forward*): a finished run ends, a released one sleeps, its
  published values (``RunUpdate.state``) merge into the run's, as if the writer had
  lived. Until then the run object shows the status and state before that update. (So
  an append that publishes costs the run object's PUT too: that is what lets
  ``list_runs`` filter on published state from the run objects, with no log read.)
* **The due index is never later than the truth.** Each run object names the one index
  entry it owns, written before the run object that names it and deleted after the run
  object that stops naming it, and never later than the run's wake-up time (an entry
  may be early: a renewed lease keeps its old entry). A claim scan lists the entries in
  key (time) order up to now and re-checks each against its run object, moving early
  entries to the right time through a run-object write. An entry its run does not
  name (a write that failed after placing it) is removed only after a no-op write of
  the run object, and with ``If-Match`` on the entry's own ETag, so an entry a writer
  is placing that moment is never lost.
* **Compaction** writes the new log whole under a new generation, then *seals* the old
  one at its end (the commit point: a stale writer there is fenced too), then points
  the run object at the new one. Readers follow seals; old generations are deleted last.
* **Requests retried by the client** (a lost reply) are recognised: every object the
  store writes carries a nonce, and a failed condition on our own write is checked
  against what is there.

S3 has no notifications: other processes' changes are found by polling the due index
(``poll_interval``, one LIST per idle worker per interval); changes made through this
process are hinted at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from .._types import RunStatus
from ..errors import LeaseLost, RunFinished, RunNotFound, SchemaVersionError
from . import _rules as rules
from ._hub import shared_hub
from ._protocol import (
    ALL_RUNS,
    Claim,
    InboxItem,
    NewRun,
    QueueLimits,
    RunCounts,
    RunQuery,
    RunRecord,
    RunUpdate,
    Snapshot,
)
from ._registry import S3Registry
from ._s3_claim import Claims, Want
from ._s3_client import Bucket, Listed
from ._s3_layout import (
    FORMAT,
    Keys,
    RunDoc,
    created_stamp,
    dump_run,
    load_run,
    log_pos,
    parse_created,
    time_key,
    wake_at,
)
from ._s3_limits import LimitedClaims
from ._s3_log import RunLogs, Tail, each, new_nonce

T = TypeVar("T")


class S3Backend(S3Registry):
    """Store in an S3-compatible bucket: ``S3Backend("bucket", "prefix",
    endpoint_url=...)`` or ``open_backend("s3://bucket/prefix?endpoint_url=...")``.
    The bucket must exist; credentials come from the standard AWS chain."""

    _bucket: Bucket
    _keys: Keys

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self._bucket = Bucket(bucket, endpoint_url=endpoint_url, region=region)
        self._keys = Keys(prefix)
        self._poll = poll_interval
        self._hub = shared_hub(f"s3:{endpoint_url or 'aws'}/{bucket}/{self._keys.root}")
        self._logs = RunLogs(self._bucket, self._keys, self._fetch)  # and the held runs' tails
        self._docs: dict[str, RunDoc] = {}  # the runs this process holds: its last run object
        self._locks: dict[str, asyncio.Lock] = {}  # ... its writes of each, one at a time
        self._claims = Claims(
            self._bucket,
            self._keys,
            self._logs,
            self._hub,
            fetch=self._fetch,
            write=self._write,
            held=self._docs,
        )
        self._limited = LimitedClaims(self._claims, self._bucket, self._keys, self._fetch)
        self.calls: dict[str, int] = {}  # operation -> count, for tests and curiosity

    @property
    def bucket(self) -> Bucket:
        """The client of this store's bucket (for tools: the bench's raw PUT)."""
        return self._bucket

    @property
    def prefix(self) -> str:
        """The key prefix of every object of this store ("" or ending in "/")."""
        return self._keys.root

    @property
    def requests(self) -> dict[str, int]:
        """S3 requests made so far, by kind (the bench's cost model counts these)."""
        return self._bucket.requests

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def poll_interval(self) -> float:
        return self._poll

    def subscribe(self) -> AsyncIterator[str]:
        return self._hub.subscribe()

    async def open(self) -> None:
        await self._bucket.open()
        got = await self._bucket.get(self._keys.format)
        if got is None:
            await self._bucket.put(self._keys.format, FORMAT, if_absent=True)
            got = await self._bucket.get(self._keys.format)
        if got is None or got[0] != FORMAT:
            found = None if got is None else got[0][:20]
            await self._bucket.close()
            raise SchemaVersionError(
                f"s3://{self._bucket.bucket}/{self._keys.root}: store format {found!r}, "
                f"this version reads {FORMAT!r}"
            )

    async def close(self) -> None:
        await self._bucket.close()

    # -- the run object -----------------------------------------------------------------

    async def _fetch(self, run_id: str) -> RunDoc | None:
        got = await self._bucket.get(self._keys.run(run_id))
        return None if got is None else load_run(*got)

    async def _write(
        self, old: RunDoc, rec: RunRecord, *, keep_after: float | None = None, **more: Any
    ) -> RunDoc | None:
        """Replace the run object ``old`` (If-Match) with ``rec``; None if another
        writer came first. Moves the run's due-index entry: the new one before, the
        old one after (see the module docstring). ``keep_after``: keep an early entry
        that is not due before that time (a renewal moves it only every other time)."""
        at = wake_at(rec)
        indexed = None if at is None else time_key(at)
        if (
            keep_after is not None
            and old.indexed is not None
            and at is not None
            and keep_after < float(old.indexed) <= at
        ):
            indexed = old.indexed
        new = replace(old, rec=rec, indexed=indexed, nonce=new_nonce(), **more)
        if indexed is not None and indexed != old.indexed:
            await self._bucket.put(self._keys.due(rec, indexed), new.nonce.encode())
        etag = await self._bucket.put(self._keys.run(rec.run_id), dump_run(new), if_match=old.etag)
        if etag is None:
            latest = await self._fetch(rec.run_id)
            if latest is None or latest.nonce != new.nonce:
                return None
            etag = latest.etag  # our write landed; its reply was lost
        if old.indexed is not None and old.indexed != indexed:
            await self._bucket.delete(self._keys.due(old.rec, old.indexed))
        return replace(new, etag=etag)

    async def _mutate(
        self,
        run_id: str,
        change: Callable[[RunDoc | None], tuple[RunRecord | None, T]],
        *,
        mine: bool = False,
        **more: Any,
    ) -> T:
        """Read, change, write the run object until its condition holds. ``change``
        returns the new record (None: write nothing) and the operation's result; it
        may raise (RunNotFound, LeaseLost ...) to refuse.

        ``mine``: an operation of the lease holder (an update, a renewal, a release).
        It starts from the run object this process wrote last, as the holder is
        usually its last writer (one PUT, no GET; a stale copy only costs a failed
        condition), and the holder's writes of one run go one at a time."""
        if not mine:
            return await self._mutate_now(run_id, change, None, **more)
        lock = self._locks.get(run_id)
        if lock is None:
            lock = self._locks[run_id] = asyncio.Lock()
        async with lock:
            return await self._mutate_now(run_id, change, self._docs.get(run_id), **more)

    async def _mutate_now(
        self,
        run_id: str,
        change: Callable[[RunDoc | None], tuple[RunRecord | None, T]],
        doc: RunDoc | None,
        **more: Any,
    ) -> T:
        while True:
            if doc is None:
                doc = await self._fetch(run_id)
            rec, result = change(doc)
            if rec is None or doc is None:
                return result
            written = await self._write(doc, rec, **more)
            if written is not None:
                if written.rec.lease_owner is not None and self._logs.holds(run_id):
                    self._docs[run_id] = written
                else:
                    self._drop_held(run_id)
                return result
            doc = None

    def _drop_held(self, run_id: str) -> None:
        """Forget what this process kept for a run it no longer holds."""
        self._logs.drop(run_id)
        self._docs.pop(run_id, None)
        self._limited.forget(run_id)
        lock = self._locks.get(run_id)
        if lock is not None and not lock.locked():
            del self._locks[run_id]

    # -- runs -----------------------------------------------------------------------------

    async def create_run(self, new: NewRun) -> bool:
        self._count("create_run")
        rec = rules.new_record(new)
        nonce = new_nonce()
        records = [new.first_record, *new.more_records]
        gen = await self._logs.begin(new.run_id, token=0, records=records, nonce=nonce)
        await self._bucket.put(self._keys.created(new.run_id, new.created_at), b"")
        at = wake_at(rec)
        doc = RunDoc(
            rec=rec,
            gen=gen,
            last_inbox_id=0,
            indexed=None if at is None else time_key(at),
            nonce=nonce,
        )
        if doc.indexed is not None:
            await self._bucket.put(self._keys.due(rec, doc.indexed), nonce.encode())
        if (
            await self._bucket.put(self._keys.run(new.run_id), dump_run(doc), if_absent=True)
            is None
        ):
            there = await self._fetch(new.run_id)
            if there is None or there.nonce != nonce:
                await self._logs.discard(new.run_id, gen)
                return False
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
        want = Want(
            queue=queue, workflows=set(workflows), owner=owner, lease_seconds=lease_seconds, now=now
        )
        if limits is not None and (limits.priority or rules.limited(limits)):
            return await self._limited.claim_due(want, limit, limits)
        return await self._claims.claim_due(want, limit)

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None:
        self._count("read")
        got = await self._logs.snapshot(run_id, log_from, None)
        if got is None:
            return None
        doc, log, end = got
        inbox: list[InboxItem] = []
        if doc.last_inbox_id > doc.rec.inbox_pos:
            inbox = await self._inbox(run_id, doc.rec.inbox_pos, doc.last_inbox_id)
        return Snapshot(run=doc.rec.evolve(log_len=end), log=log, inbox=inbox)

    async def _inbox(self, run_id: str, after: int, last: int) -> list[InboxItem]:
        listed = await self._bucket.list(
            self._keys.inbox(run_id), after=self._keys.item(run_id, after)
        )
        ids = [i for i in (log_pos(o.key) for o in listed) if i <= last]
        got = await each(ids, lambda i: self._bucket.get(self._keys.item(run_id, i)))
        return [InboxItem(id=i, data=g[0]) for i, g in zip(ids, got, strict=True) if g is not None]

    async def read_log_page(
        self, run_id: str, *, start: int, stop: int
    ) -> tuple[RunRecord, list[bytes]] | None:
        self._count("read_log_page")
        got = await self._logs.snapshot(run_id, start, max(start, stop))
        if got is None:
            return None
        doc, log, end = got
        return doc.rec.evolve(log_len=end), log

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
        tail = await self._logs.tail_at(run_id, token, expected_len)
        records = list(records)
        if not records:  # a status change alone: the run object's write is fenced by token
            if update is not None:
                await self._settle(run_id, tail, update, now)
            return tail.end
        end = await self._logs.append(run_id, tail, records, update)
        if end is None:
            raise rules.log_moved(run_id, f"past {tail.end}", expected_len)
        if update is not None:
            await self._settle(run_id, tail, update, now)
        return end

    async def _settle(self, run_id: str, tail: Tail, update: RunUpdate, now: float) -> None:
        """Apply an append's run update to the run object (the log holds it already)."""
        end, gen = tail.end, tail.gen
        ends = False

        def change(doc: RunDoc | None) -> tuple[RunRecord | None, None]:
            nonlocal ends
            if doc is None:
                raise RunNotFound(run_id)
            if doc.rec.lease_token != tail.token:
                raise LeaseLost(run_id)  # a claimer took it (and rolled this forward)
            rec, ends = rules.appended(
                doc.rec, update, log_len=end, last_inbox_id=doc.last_inbox_id, now=now
            )
            return rec, None

        try:
            await self._mutate(run_id, change, mine=True, gen=gen)
        except LeaseLost:
            self._drop_held(run_id)
            raise
        finally:
            if ends or rules.ends_lease(update):
                self._drop_held(run_id)
        if ends:
            self._hub.publish(run_id)

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
        tail = await self._logs.tail_at(run_id, token, expected_len)
        records = list(records)
        gen = await self._logs.compact(run_id, tail, records)
        if gen is None:
            raise rules.log_moved(run_id, f"past {tail.end}", expected_len)

        def change(doc: RunDoc | None) -> tuple[RunRecord | None, None]:
            if doc is None or doc.rec.lease_token != token:
                return None, None  # the seal is the commit; a later claimer follows it
            return doc.rec.evolve(log_len=len(records)), None

        await self._mutate(run_id, change, mine=True, gen=gen)
        await self._logs.drop_generations(run_id, keep=gen)
        return len(records)

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        self._count("renew")

        async def one(item: tuple[str, int]) -> bool:
            run_id, token = item

            def change(doc: RunDoc | None) -> tuple[RunRecord | None, bool]:
                if doc is None or not rules.holds_lease(doc.rec, token):
                    return None, False
                return doc.rec.evolve(lease_expires_at=now + lease_seconds), True

            # The index entry stays at an older expiry until that is half a lease
            # away: then it moves (two requests more), so no claimer ever finds a
            # held run due and every other renewal is one PUT.
            keep = now + lease_seconds / 2
            return await self._mutate(run_id, change, mine=True, keep_after=keep)

        items = list(leases.items())
        held = await each(items, one, parallel=max(len(items), 1))  # all at once
        return {run_id for (run_id, _), ok in zip(items, held, strict=True) if ok}

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
        tail = self._logs.held(run_id, token)

        def change(doc: RunDoc | None) -> tuple[RunRecord | None, bool]:
            if doc is None or not rules.holds_lease(doc.rec, token):
                return None, False
            rec = doc.rec
            if tail is not None:
                rec = rec.evolve(log_len=tail.end)
            pending = doc.last_inbox_id > rec.inbox_pos
            return rules.released(rec, status=status, due_at=due_at, now=now, pending=pending), True

        done = await self._mutate(run_id, change, mine=True)
        self._drop_held(run_id)
        if done:
            self._hub.publish(run_id)
        return done

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        self._count("deliver")
        doc = await self._fetch(run_id)
        if doc is None:
            raise RunNotFound(run_id)
        if doc.rec.status.is_terminal:
            raise RunFinished(run_id, doc.rec.status.value)
        item_id = doc.last_inbox_id + 1
        while (
            await self._bucket.put(self._keys.item(run_id, item_id), data, if_absent=True) is None
        ):
            item_id += 1  # a concurrent delivery holds this id

        def change(doc: RunDoc | None) -> tuple[RunRecord | None, None]:
            if doc is None:
                raise RunNotFound(run_id)
            if doc.rec.status.is_terminal:
                raise RunFinished(run_id, doc.rec.status.value)
            return doc.rec.evolve(due_at=now), None

        while True:
            latest = await self._fetch(run_id)
            try:
                rec, _ = change(latest)
            except (RunNotFound, RunFinished):
                await self._bucket.delete(self._keys.item(run_id, item_id))
                raise
            assert latest is not None and rec is not None
            last = max(latest.last_inbox_id, item_id)
            if await self._write(latest, rec, last_inbox_id=last) is not None:
                break
        self._hub.publish(run_id)
        return item_id

    async def request_cancel(self, run_id: str, *, now: float, revert: bool = False) -> None:
        self._count("request_cancel")

        def change(doc: RunDoc | None) -> tuple[RunRecord | None, bool]:
            if doc is None:
                raise RunNotFound(run_id)
            rec = doc.rec
            if rec.status.is_terminal:
                return None, False
            wish = revert or rec.revert_requested
            return rec.evolve(cancel_requested=True, revert_requested=wish, due_at=now), True

        if await self._mutate(run_id, change):
            self._hub.publish(run_id)

    async def reopen(
        self, run_id: str, *, status: RunStatus, expected_len: int, keep_len: int, now: float
    ) -> bool:
        self._count("reopen")
        got = await self._logs.snapshot(run_id, 0, keep_len)
        if got is None:
            raise RunNotFound(run_id)
        doc, kept, _ = got
        if doc.rec.status != status or doc.rec.log_len != expected_len:
            return False
        gen = await self._logs.begin(run_id, token=doc.rec.lease_token, records=kept)

        def change(doc: RunDoc | None) -> tuple[RunRecord | None, bool]:
            if doc is None:
                raise RunNotFound(run_id)
            if doc.rec.status != status or doc.rec.log_len != expected_len:
                return None, False
            return rules.reopened(doc.rec, keep_len=len(kept), now=now), True

        if not await self._mutate(run_id, change, gen=gen):
            await self._logs.discard(run_id, gen)
            return False
        await self._logs.drop_generations(run_id, keep=gen)
        self._hub.publish(run_id)
        return True

    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run object's record. Its ``log_len`` counts the records up to the last
        run update; ``read`` counts the log itself."""
        self._count("get_run")
        doc = await self._fetch(run_id)
        return None if doc is None else doc.rec

    async def _all_runs(self) -> list[RunRecord]:
        listed = await self._bucket.list(self._keys.runs)
        docs = await each(listed, lambda o: self._fetch(self._keys.run_id_of(o.key)))
        return [d.rec for d in docs if d is not None]

    async def list_runs(self, query: RunQuery = ALL_RUNS) -> list[RunRecord]:
        """Newest first from the creation index; each candidate's run object is read,
        so a page costs about one GET per run it shows (plus those the filter drops)."""
        self._count("list_runs")
        if query.run_ids is not None:
            docs = await each(sorted(query.run_ids), self._fetch)
            return rules.newest_first((d.rec for d in docs if d is not None), query)
        listed = await self._bucket.list(self._keys.created_all)
        slack = 1e-5  # the keys hold microseconds: the exact test is rules.matches below
        order = sorted((p for p in map(parse_created, (o.key for o in listed)) if p), reverse=True)
        order = [
            p
            for p in order
            if (query.before is None or p[0] - slack <= query.before[0])
            and (query.created_after is None or p[0] + slack >= query.created_after)
            and (query.created_before is None or p[0] - slack <= query.created_before)
        ]
        limit = None if query.limit is None else max(query.limit, 0)
        out: list[RunRecord] = []
        for i in range(0, len(order), 64):
            chunk = order[i : i + 64]
            docs = await each(chunk, lambda p: self._fetch(p[1]))
            for (_, _, stamp), d in zip(chunk, docs, strict=True):
                # a run has one entry of its own; another is a lost create's
                own = d is not None and created_stamp(d.rec.created_at) == stamp
                if own and d is not None and rules.matches(d.rec, query):
                    out.append(d.rec)
            if limit is not None and len(out) >= limit:
                break
        return rules.newest_first(out, query)

    async def count_runs(self) -> RunCounts:
        """Reads every run object: S3 keeps no counters (a LIST per 1,000 runs + a GET each)."""
        self._count("count_runs")
        return rules.tally(await self._all_runs())

    # -- tests and tools ------------------------------------------------------------------

    async def corrupt(self, run_id: str, position: int, data: bytes) -> None:
        """Overwrite one stored log record (to test how bad data is handled)."""
        doc = await self._fetch(run_id)
        assert doc is not None
        await self._logs.overwrite(run_id, doc.gen, position, data)

    async def drop_everything(self) -> None:
        """Delete every object under this prefix (tests' cleanup); works after close() too."""
        reopened = self._bucket._client is None
        if reopened:
            await self._bucket.open()
        try:
            listed: list[Listed] = await self._bucket.list(self._keys.root)
            await self._bucket.delete_many([o.key for o in listed])
        finally:
            if reopened:
                await self._bucket.close()
