"""Durable-execution semantics over the storage protocol.

The journal is the only caller of a backend. It turns workflow-level intents
(start a run, send an event, append a step, finish) into protocol operations,
encodes and decodes records, and enforces the payload limit. A
:class:`RunSession` is one worker's lease on one run: it holds the decoded log
and is what the engine appends through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from . import _records as R
from ._types import LogRecord, RunStatus, RunSummary
from .backends import (
    Backend,
    Claim,
    JoinsTransactions,
    NewRun,
    RunQuery,
    RunRecord,
    RunUpdate,
    default_url,
)
from .codec import dumps
from .errors import (
    BackendError,
    ConfigurationError,
    CorruptRecord,
    LeaseLost,
    RunFinished,
    RunNotFound,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
DEFAULT_MAX_PAYLOAD = 1_048_576


def decode_record(run_id: str, position: int, data: bytes) -> R.Record:
    """Decode one stored record, or raise CorruptRecord saying why."""
    try:
        rec = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord(run_id, position, f"not valid JSON ({exc})") from None
    if not isinstance(rec, dict) or rec.get("k") not in R.KINDS:
        raise CorruptRecord(run_id, position, "not a Substantial record (unknown kind)")
    if position == 0 and rec["k"] != R.START:
        raise CorruptRecord(run_id, 0, "the log does not begin with a start record")
    if rec["k"] in (R.CALL, R.TRY, R.ARM, R.LOG) and not isinstance(rec.get("s"), int):
        raise CorruptRecord(run_id, position, "durable-call record without a sequence id")
    return rec


def to_datetime(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def store_label(backend: Backend | str | None) -> str:
    """How logs name a store: its URL without credentials or query, or its type."""
    if backend is not None and not isinstance(backend, str):
        return type(backend).__name__
    parts = urlsplit(backend or default_url())
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{parts.path}"


def summarize(run: RunRecord) -> RunSummary:
    return RunSummary(
        run_id=run.run_id,
        workflow=run.workflow,
        status=run.status,
        started_at=to_datetime(run.started_at),
        ended_at=to_datetime(run.ended_at),
        result=run.result,
        error=run.error,
        queue=run.queue,
        error_type=run.error_type,
        parent_id=run.parent_id,
    )


class Journal:
    """Workflow-level operations on one backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
        clock: Clock = time.time,
        label: str | None = None,
    ) -> None:
        self.backend = backend
        self.label = label or type(backend).__name__
        self.max_payload = max_payload_bytes
        self.clock = clock

    # -- the store's lifecycle and hints (nothing else touches the backend) --------

    async def open(self) -> None:
        """Connect and set up the store (idempotent)."""
        await self.backend.open()

    async def close(self) -> None:
        await self.backend.close()

    def hints(self) -> AsyncIterator[str]:
        """The store's change hints; the first, ``""``, once the subscription is live."""
        return self.backend.subscribe()

    @property
    def poll_interval(self) -> float | None:
        """How often to look for changes other processes made (None: never needed)."""
        return self.backend.poll_interval

    def encode(self, rec: R.Record, what: str) -> bytes:
        return dumps(rec, what=what, limit=self.max_payload)

    async def create(
        self,
        *,
        run_id: str,
        workflow: str,
        kwargs: dict[str, Any],
        queue: str,
        parent_id: str | None = None,
        connection: Any = None,
        origin: str | None = None,
    ) -> bool:
        """``origin``: for a run continuing another (continue_using), the first run's
        id, under which a parent waits for it."""
        now = self.clock()
        start: R.Record = {"k": R.START, "wf": workflow, "kw": kwargs, "t": now}
        if origin is not None:
            start["origin"] = origin
        first = self.encode(start, f"start({workflow!r}) kwargs")
        new = NewRun(
            run_id=run_id,
            workflow=workflow,
            queue=queue,
            first_record=first,
            created_at=now,
            due_at=now,
            parent_id=parent_id,
        )
        if connection is not None:
            if not isinstance(self.backend, JoinsTransactions):
                raise ConfigurationError(
                    "start(connection=...) joins the caller's transaction; only the "
                    f"PostgreSQL store supports it, not {type(self.backend).__name__}"
                )
            return await self.backend.create_run_in(new, connection)
        return await self.backend.create_run(new)

    async def deliver(self, run_id: str, name: str, value: Any) -> int:
        data = self.encode({"name": name, "v": value}, f"send({name!r}) value")
        return await self.backend.deliver(run_id, data, now=self.clock())

    async def forward_events(self, run_id: str, successor: str, unobserved: list[bytes]) -> None:
        """Deliver ``unobserved`` (events in the ended run's log it never saw) and
        then what is left in its inbox to the run that continues it, in order.

        Best effort across a crash: a worker dying between the end write and this
        loses these events (the window is one round trip per event)."""
        snap = await self.backend.read(run_id, log_from=-1)
        pending = [item.data for item in snap.inbox] if snap is not None else []
        for data in [*unobserved, *pending]:
            with contextlib.suppress(RunNotFound, RunFinished):
                await self.backend.deliver(successor, data, now=self.clock())

    async def cancel(self, run_id: str) -> None:
        await self.backend.request_cancel(run_id, now=self.clock())

    async def claim(
        self, *, queue: str, workflows: Collection[str], limit: int, owner: str, lease: float
    ) -> list[Claim]:
        return await self.backend.claim_due(
            queue=queue,
            workflows=workflows,
            limit=limit,
            owner=owner,
            lease_seconds=lease,
            now=self.clock(),
        )

    async def renew(self, leases: Mapping[str, int], lease: float) -> set[str]:
        """Extend the leases (run id -> token); returns the run ids still held."""
        return await self.backend.renew(leases, lease_seconds=lease, now=self.clock())

    async def get(self, run_id: str) -> RunRecord:
        run = await self.backend.get_run(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    async def get_or_none(self, run_id: str) -> RunRecord | None:
        return await self.backend.get_run(run_id)

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        """Runs matching ``query``, newest first (one page of at most ``query.limit``)."""
        return await self.backend.list_runs(query)

    async def logs(self, run_id: str) -> list[LogRecord]:
        snap = await self.backend.read(run_id)
        if snap is None:
            raise RunNotFound(run_id)
        out = []
        for i, data in enumerate(snap.log):
            rec = decode_record(run_id, i, data)
            if rec["k"] == R.LOG:
                out.append(
                    LogRecord(
                        level=rec["level"],
                        message=rec["msg"],
                        fields=rec.get("fields") or {},
                        at=datetime.fromtimestamp(rec["t"], UTC),
                    )
                )
        return out

    async def open_session(self, claim: Claim, lease: float) -> RunSession | None:
        snap = await self.backend.read(claim.run_id)
        if snap is None:
            return None
        session = RunSession(self, claim, snap.run, lease)
        session.load(snap.log)
        if not snap.inbox:
            session._dirty = False  # this read saw the inbox empty: no need to read again
        return session


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
        """Append records; returns the log position of the first. Fenced."""
        if self.lost is not None:
            raise self.lost
        encoded = [self.journal.encode(r, what) for r in recs]
        pos = len(self.records)
        try:
            await self.journal.backend.append(
                self.run_id,
                token=self.token,
                expected_len=pos,
                records=encoded,
                update=update,
                now=self.journal.clock(),
            )
        except BackendError as exc:  # lease lost, or store unreachable: stop writing
            self.lost = exc
            raise
        self.records.extend(recs)
        return pos

    async def rewrite(self, recs: Sequence[R.Record]) -> None:
        """Replace the whole log (compaction). Fenced like ``append``."""
        if self.lost is not None:
            raise self.lost
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
        """Move pending inbox items into the log (their position is now fixed)."""
        self._dirty = False
        self._changed.clear()
        snap = await self.journal.backend.read(self.run_id, log_from=len(self.records))
        if snap is None:
            raise RunNotFound(self.run_id)
        self.run = snap.run
        if snap.log or snap.run.lease_token != self.token:
            self.lost = LeaseLost(self.run_id)
            raise self.lost
        if not snap.inbox:
            return
        events = []
        for item in snap.inbox:
            try:
                body = orjson.loads(item.data)
                events.append(
                    {"k": R.EVENT, "name": str(body["name"]), "v": body.get("v"), "id": item.id}
                )
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("run %s: dropping undecodable inbox item %d", self.run_id, item.id)
        await self.append(events, RunUpdate(inbox_pos=snap.inbox[-1].id), "event")

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
        extra: Sequence[R.Record] = (),
    ) -> None:
        """Append the end record (after any ``extra`` records) and set the final
        status in one write."""
        now = self.journal.clock()
        end: R.Record = {"k": R.END, "status": status.value}
        if status == RunStatus.FAILED:
            end["err"] = {"type": error_type, "msg": error}
            update = RunUpdate(status=status, error=error or "", ended_at=now)
        else:
            end["v"] = result
            update = RunUpdate(status=status, result=result, ended_at=now)
        await self.append([*extra, end], update, "the run's result")
        self.released = True

    async def suspend(self, due: float | None) -> None:
        """Give the run back to the store until ``due`` (or its next event)."""
        if self.lost is not None:
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
