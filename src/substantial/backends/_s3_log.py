"""The logs of the S3 store's runs: reading a log across its generations, and writing
at its end, each write conditional on the position it takes (the design is in ``s3``).

Why what this keeps in memory can never make the store wrong:

* **A log object never changes once it holds records** (a fence is replaced, a record
  object never is; a compaction writes new keys under a new generation). So the object
  cache needs no invalidation, and a read that finds a listed object gone (a compaction
  deleted it) raises ``Moved``: the reader starts again from the run object.
* **A tail is a hint, the condition is the check.** A writer appends only at the end it
  knows, with ``If-None-Match: *``, or ``If-Match`` on its own fence for its first
  append after a claim. If another writer took that position (a claimer with a newer
  token fenced it), the condition fails and nothing is written: a stale tail costs one
  failed request, never a record. A tail that may be wrong is dropped and found again
  from the run object (the lease) and the log (its end and fence).
* **A lost reply is told from a lost race** by the nonce each object carries: a failed
  condition on a write of ours that landed (the client retried it) is a success. A fence
  of our own token that racing claimers of that token re-placed is followed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import BackendError, LeaseLost, RunNotFound
from . import _rules as rules
from ._protocol import RunUpdate
from ._s3_client import Bucket
from ._s3_layout import Keys, LogObject, RunDoc, dump_log, load_log, log_pos

T = TypeVar("T")
PARALLEL = 16  # requests in flight for one operation (a log read, a claim scan)
_CACHE = 4096  # log objects kept in memory (they never change once written)
# times a first append follows a fence of its own token that racing claimers re-placed:
# each is a claimer that read the run object before our claim, so a few at most
_FOLLOWS = 8


def new_nonce() -> str:
    """A random tag for what we write: a retried write recognises its own by it."""
    return uuid.uuid4().hex[:16]


async def each(
    items: Sequence[Any], fn: Callable[[Any], Awaitable[T]], parallel: int = PARALLEL
) -> list[T]:
    """``fn`` over ``items`` with at most ``parallel`` in flight, results in order."""
    gate = asyncio.Semaphore(parallel)

    async def one(item: Any) -> T:
        async with gate:
            return await fn(item)

    return list(await asyncio.gather(*(one(i) for i in items)))


@dataclass(slots=True)
class Tail:
    """What this process knows of the log end of a run it holds the lease of."""

    token: int
    gen: str
    positions: list[int]  # the record objects of ``gen``, in order
    end: int  # the log's length
    fence: str | None  # ETag of the fence at ``end`` our first append replaces


@dataclass(slots=True)
class Scan:
    """A log as listed: its current generation, record objects, length, last object."""

    gen: str
    positions: list[int]
    end: int
    last: LogObject | None


class Moved(Exception):
    """The log changed under a read (a compaction deleted what it listed): read again."""


class RunLogs:
    """The runs' logs as this process sees them: the log objects it read or wrote and
    the tail of each run it holds. ``fetch`` reads a run object: where a log starts
    (its generation) and who may write it (the lease token) are named there."""

    def __init__(
        self, bucket: Bucket, keys: Keys, fetch: Callable[[str], Awaitable[RunDoc | None]]
    ) -> None:
        self._bucket = bucket
        self._keys = keys
        self._fetch = fetch
        self._tails: dict[str, Tail] = {}  # the runs this process holds: their log ends
        self._objects: OrderedDict[str, LogObject] = OrderedDict()

    # -- reading --------------------------------------------------------------------------

    async def _object(self, run_id: str, key: str) -> LogObject | None:
        hit = self._objects.get(key)
        if hit is not None:
            self._objects.move_to_end(key)
            return hit
        got = await self._bucket.get(key)
        if got is None:
            return None
        obj = load_log(run_id, log_pos(key), *got)
        if obj.records:  # fences are replaced; record objects never change
            self._remember(key, obj)
        return obj

    def _remember(self, key: str, obj: LogObject) -> None:
        self._objects[key] = obj
        if len(self._objects) > _CACHE:
            self._objects.popitem(last=False)

    async def scan(self, run_id: str, gen: str) -> Scan:
        """The log's generation, record objects and end, following seals."""
        while True:
            listed = await self._bucket.list(self._keys.gen(run_id, gen))
            if not listed:
                return Scan(gen, [], 0, None)
            last = await self._object(run_id, listed[-1].key)
            if last is None:
                raise Moved
            if last.seal is not None:
                gen = last.seal
                continue
            positions = [log_pos(o.key) for o in listed]
            if last.fence:
                positions.pop()
            return Scan(gen, positions, last.end, last)

    async def _records(
        self, run_id: str, gen: str, positions: list[int], start: int = 0, stop: int | None = None
    ) -> list[bytes]:
        """The records at ``start <= pos < stop`` of the objects at ``positions``."""
        bounds = [*positions[1:], None]
        wanted = [
            p
            for p, nxt in zip(positions, bounds, strict=True)
            if (nxt is None or nxt > start) and (stop is None or p < stop)
        ]
        objs = await each(wanted, lambda p: self._object(run_id, self._keys.log(run_id, gen, p)))
        out: list[bytes] = []
        for p, obj in zip(wanted, objs, strict=True):
            if obj is None:
                raise Moved
            out.extend(obj.records[max(start - p, 0) : None if stop is None else max(stop - p, 0)])
        return out

    async def snapshot(
        self, run_id: str, start: int, stop: int | None
    ) -> tuple[RunDoc, list[bytes], int] | None:
        """The run object, its records in ``[start, stop)`` and the log's length."""
        for _ in range(10):
            doc = await self._fetch(run_id)
            if doc is None:
                return None
            try:
                tail = self._tails.get(run_id)
                if (
                    tail is not None
                    and tail.token == doc.rec.lease_token
                    and doc.rec.lease_owner is not None
                ):
                    gen, positions, end = tail.gen, list(tail.positions), tail.end
                else:
                    scan = await self.scan(run_id, doc.gen)
                    gen, positions, end = scan.gen, scan.positions, scan.end
                if start < 0:
                    start = max(end + start, 0)
                return doc, await self._records(run_id, gen, positions, start, stop), end
            except Moved:
                continue
        raise BackendError(f"run {run_id!r}: its log kept moving while being read")

    # -- the tails of held runs -----------------------------------------------------------

    def holds(self, run_id: str) -> bool:
        return run_id in self._tails

    def held(self, run_id: str, token: int) -> Tail | None:
        """The tail kept for ``run_id`` if it is the one of ``token``."""
        tail = self._tails.get(run_id)
        return tail if tail is not None and tail.token == token else None

    def hold(self, run_id: str, token: int, scan: Scan, fence: str | None) -> None:
        """Keep the tail of a run just claimed with ``token`` (behind ``fence``)."""
        self._tails[run_id] = Tail(token, scan.gen, scan.positions, scan.end, fence)

    def drop(self, run_id: str) -> None:
        """Forget the tail of a run this process no longer holds."""
        self._tails.pop(run_id, None)

    def _forget(self, run_id: str, tail: Tail) -> None:
        if self._tails.get(run_id) is tail:
            del self._tails[run_id]

    async def _tail(self, run_id: str, token: int) -> Tail:
        """The log end a writer with ``token`` appends at: known, or found and checked."""
        tail = self.held(run_id, token)
        if tail is not None:
            return tail
        doc = await self._fetch(run_id)
        if doc is None:
            raise RunNotFound(run_id)
        if doc.rec.lease_token != token:
            raise LeaseLost(run_id)
        try:
            scan = await self.scan(run_id, doc.gen)
        except Moved:
            raise LeaseLost(run_id) from None
        last = scan.last
        fence = None
        if last is not None and last.fence:
            if last.token != token:
                raise LeaseLost(run_id)
            fence = last.etag
        elif last is not None and last.token > token:
            raise LeaseLost(run_id)
        tail = Tail(token, scan.gen, scan.positions, scan.end, fence)
        self._tails[run_id] = tail
        return tail

    async def tail_at(self, run_id: str, token: int, expected_len: int) -> Tail:
        """The tail, if the log is ``expected_len`` long (else "log moved"). A known
        end that disagrees is checked against the store first: another writer with
        this token (this run's lost lease, not yet noticed) may have moved it."""
        tail = await self._tail(run_id, token)
        if tail.end != expected_len:
            self._forget(run_id, tail)
            tail = await self._tail(run_id, token)
            if tail.end != expected_len:
                raise rules.log_moved(run_id, tail.end, expected_len)
        return tail

    # -- writing --------------------------------------------------------------------------

    async def _put_at(self, run_id: str, tail: Tail, body: bytes, nonce: str) -> bool:
        """Write the log object at the tail's end: replacing our fence, or a new
        position. False if another writer holds that position."""
        key = self._keys.log(run_id, tail.gen, tail.end)
        for _ in range(_FOLLOWS):
            if tail.fence is not None:
                etag = await self._bucket.put(key, body, if_match=tail.fence)
            else:
                etag = await self._bucket.put(key, body, if_absent=True)
            if etag is not None:
                return True
            there = await self._bucket.get(key)
            if there is None:
                tail.fence = None
                continue
            obj = load_log(run_id, tail.end, *there)
            if obj.nonce == nonce:
                return True  # our write landed; its reply was lost
            if obj.fence and obj.token == tail.token and obj.etag != tail.fence:
                # a claimer of our token that lost the run object to us re-placed the
                # fence: the position is still ours (no one else holds this token)
                tail.fence = obj.etag
                continue
            return False
        return False

    async def append(
        self, run_id: str, tail: Tail, records: list[bytes], update: RunUpdate | None
    ) -> int | None:
        """Write ``records`` (and the run update they carry) at the tail's end: the
        log's new length, or None if another writer holds that position (the tail was
        wrong, and is forgotten)."""
        nonce = new_nonce()
        body = dump_log(token=tail.token, nonce=nonce, records=records, update=update)
        if not await self._put_at(run_id, tail, body, nonce):
            self._forget(run_id, tail)
            return None
        pos = tail.end
        self._remember(
            self._keys.log(run_id, tail.gen, pos),
            LogObject(pos=pos, records=records, token=tail.token, update=update, nonce=nonce),
        )
        tail.positions.append(pos)
        tail.end = end = pos + len(records)
        tail.fence = None
        return end

    async def fence(self, run_id: str, scan: Scan, token: int) -> str | None:
        """Reserve the log's next position for ``token``, before a claim writes that
        token into the run object: the fence's ETag, or None if a writer or another
        claimer got there first. A fence left there (a claim that failed after placing
        it) is replaced on its ETag."""
        key = self._keys.log(run_id, scan.gen, scan.end)
        body = dump_log(token=token, nonce=new_nonce(), fence=True)
        last = scan.last
        if last is not None and last.fence:
            return await self._bucket.put(key, body, if_match=last.etag)
        return await self._bucket.put(key, body, if_absent=True)

    async def begin(
        self, run_id: str, *, token: int, records: list[bytes], nonce: str | None = None
    ) -> str:
        """Write a new generation holding ``records`` (a new run's log, a reopened
        run's kept part); nothing reads it before a run object names it."""
        gen = new_nonce()[:12]
        body = dump_log(token=token, nonce=new_nonce() if nonce is None else nonce, records=records)
        await self._bucket.put(self._keys.log(run_id, gen, 0), body)
        return gen

    async def discard(self, run_id: str, gen: str) -> None:
        """Delete a generation ``begin`` wrote that no run object came to name."""
        await self._bucket.delete(self._keys.log(run_id, gen, 0))

    async def compact(self, run_id: str, tail: Tail, records: list[bytes]) -> str | None:
        """Write ``records`` as a new generation and seal the tail's one at its end (the
        commit point): the new generation, kept as the tail, or None if another writer
        holds the tail's end (the new generation is deleted)."""
        gen, nonce = new_nonce()[:12], new_nonce()
        new_key = self._keys.log(run_id, gen, 0)
        await self._bucket.put(new_key, dump_log(token=tail.token, nonce=nonce, records=records))
        seal = dump_log(token=tail.token, nonce=nonce, seal=gen)
        if not await self._put_at(run_id, tail, seal, nonce):
            await self._bucket.delete(new_key)
            return None
        self._tails[run_id] = Tail(tail.token, gen, [0], len(records), None)
        return gen

    async def drop_generations(self, run_id: str, *, keep: str) -> None:
        """Delete the log objects of every generation but ``keep`` (after a compaction
        or a reopen has pointed the run object at it)."""
        listed = await self._bucket.list(self._keys.logs(run_id))
        stale = [o.key for o in listed if o.key.rsplit("/", 2)[1] != keep]
        await self._bucket.delete_many(stale)

    async def overwrite(self, run_id: str, gen: str, position: int, data: bytes) -> None:
        """Replace one stored record (for tests of how bad data is handled)."""
        scan = await self.scan(run_id, gen)
        for p in reversed(scan.positions):
            if p <= position:
                key = self._keys.log(run_id, scan.gen, p)
                obj = await self._object(run_id, key)
                assert obj is not None
                records = list(obj.records)
                records[position - p] = data
                self._objects.pop(key, None)
                await self._bucket.put(
                    key,
                    dump_log(
                        token=obj.token, nonce=new_nonce(), records=records, update=obj.update
                    ),
                )
                return
