"""Durable-execution semantics over the storage protocol.

The journal is the only caller of a backend. It turns workflow-level intents
(start a run, send an event, append a step, finish) into protocol operations,
encodes and decodes records, and enforces the payload limit. A
:class:`RunSession` is one worker's lease on one run: it holds the decoded log
and is what the engine appends through.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from . import _records as R
from . import telemetry
from ._group_commit import GroupCommit, append_alone
from ._history import HistoryEntry, PageScan, history_page, parse_cursor
from ._records import decode_record
from ._recovery import decoded, fork_point, resume_point
from ._session import RunEnd, RunSession
from ._types import LogRecord, RunStatus, RunSummary, WorkerInfo
from .backends import (
    Append,
    AppendsInBatches,
    Backend,
    Claim,
    Claims,
    CountsRuns,
    InboxItem,
    JoinsTransactions,
    KnowsNextDue,
    Migrates,
    NewRun,
    PagesLog,
    QueueLimits,
    RunCounts,
    RunQuery,
    RunRecord,
    WorkerRecord,
    default_url,
)
from .codec import dumps
from .errors import (
    ClientError,
    ConfigurationError,
    RunFinished,
    RunNotFound,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "Clock",
    "Journal",
    "RunEnd",
    "RunSession",
    "decode_record",
    "summarize",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Probe(Protocol):
    """Sees a journal's effects and appends (``Journal.set_probe``)."""

    def effect(self, run_id: str, name: str, f: Callable[[], Any]) -> Callable[[], Any]:
        """What to call instead of ``f``, the effect of save ``name`` of ``run_id``."""
        ...

    def appended(self, run_id: str, records: Sequence[bytes]) -> None:
        """``records`` of ``run_id`` are durable now."""
        ...


_RESUMABLE = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})
DEFAULT_MAX_PAYLOAD = 1_048_576
COUNT_PAGE = 500  # runs per page when counting a store that cannot count (CountsRuns)
SCAN_MAX = 4096  # records per read at most while a history page reads on


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
        state={} if run.state is None else dict(run.state),
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
        self._stubs: dict[str, Callable[[], Any]] = {}  # step name -> its stand-in effect
        self._probe: Probe | None = None
        self._end_watchers: list[Callable[[RunEnd], None]] = []
        self._group = GroupCommit(backend)
        # Sessions append through this: batched with the other runs' appends where
        # the store commits them together (see _group_commit), else straight through.
        self.append: Callable[[Append], Awaitable[int]] = (
            self._group.append
            if isinstance(backend, AppendsInBatches)
            else functools.partial(append_alone, backend)
        )

    def set_probe(self, probe: Probe) -> None:
        """Watch every effect and every append of this journal's runs (the crash
        matrix's worker processes do: they count effects and die at boundaries)."""
        self._probe = probe
        store_append = self.append

        async def probed(a: Append) -> int:
            n = await store_append(a)
            probe.appended(a.run_id, a.records)
            return n

        self.append = probed

    def stub(self, name: str, effect: Callable[[], Any] | None) -> None:
        """From now on run ``effect`` instead of the effect of every save named
        ``name`` (None: the real one again). For tests (``TestEnvironment.stub``):
        the stand-in's value or exception is recorded as the real one's would be."""
        if effect is None:
            self._stubs.pop(name, None)
        else:
            self._stubs[name] = effect

    def effect(self, run_id: str, name: str, f: Callable[[], Any]) -> Callable[[], Any]:
        """What a save named ``name`` calls: ``f``, or the stub of that name (or of
        its last dotted part, so ``charge`` stubs ``checkout.<locals>.charge``, or
        ``"*"``, every save); seen by the probe if there is one."""
        if self._stubs:
            stubs = self._stubs
            f = stubs.get(name) or stubs.get(name.rsplit(".", 1)[-1]) or stubs.get("*") or f
        return f if self._probe is None else self._probe.effect(run_id, name, f)

    # -- the store's lifecycle and hints (nothing else touches the backend) --------

    async def open(self) -> None:
        """Connect and set up the store (idempotent)."""
        await self.backend.open()

    @property
    def appends_queued(self) -> int:
        """Sessions' appends waiting to go to the store as the next batch."""
        return self._group.queued

    async def close(self) -> None:
        await self._group.close()
        await self.backend.close()

    async def migrate(self) -> int | None:
        """Apply the store's schema migrations; its schema version (None: it has none)."""
        if isinstance(self.backend, Migrates):
            return await self.backend.migrate()
        return None

    def watch_ends(self, watcher: Callable[[RunEnd], None]) -> None:
        """Call ``watcher(end)`` as soon as a worker of this journal has made a
        run's end durable: this process's ``result()`` waiters wake then, without
        waiting for the store's hint of the end to come back (on PostgreSQL or
        Redis, a round trip through the server; the hint still comes, and finds
        nobody waiting), and return ``end`` without reading the run's row back."""
        self._end_watchers.append(watcher)

    def run_ended(self, end: RunEnd) -> None:
        """A session's end record is durable (see :meth:`watch_ends`)."""
        for watcher in self._end_watchers:
            watcher(end)

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
        timeout: float | None = None,
        deadline: float | None = None,
        delay: float = 0.0,
        priority: int = 0,
        concurrency_key: str | None = None,
    ) -> bool:
        """``origin``: for a run continuing another (continue_using), the first run's
        id, under which a parent waits for it. ``timeout`` (seconds from now) or
        ``deadline`` (epoch seconds, carried over by continue_using): when the run
        must be over, recorded in its start record. ``delay``: seconds before a
        worker may claim it."""
        now = self.clock()
        start: R.Record = {"k": R.START, "wf": workflow, "kw": kwargs, "t": now}
        if origin is not None:
            start["origin"] = origin
        if deadline is None and timeout is not None:
            deadline = now + timeout
        if deadline is not None:
            start["deadline"] = deadline
        telemetry.inject_context(start, run_id)  # the caller's trace, so the run's spans join it
        first = self.encode(start, f"start({workflow!r}) kwargs")
        new = NewRun(
            run_id=run_id,
            workflow=workflow,
            queue=queue,
            first_record=first,
            created_at=now,
            due_at=now + delay,
            parent_id=parent_id,
            priority=priority,
            concurrency_key=concurrency_key,
        )
        if connection is not None:
            if not isinstance(self.backend, JoinsTransactions):
                raise ConfigurationError(
                    "start(connection=...) joins the caller's transaction; only the "
                    f"PostgreSQL store supports it, not {type(self.backend).__name__}"
                )
            return await self.backend.create_run_in(new, connection)
        return await self.backend.create_run(new)

    async def inbox(self, run_id: str) -> list[InboxItem]:
        """The run's inbox items not yet taken into its log, oldest first."""
        snap = await self.backend.read(run_id, log_from=-1)  # (the inbox; one record of the log)
        if snap is None:
            raise RunNotFound(run_id)
        return list(snap.inbox)

    async def deliver(self, run_id: str, name: str, value: Any) -> int:
        data = self.encode({"name": name, "v": value}, f"send({name!r}) value")
        return await self.backend.deliver(run_id, data, now=self.clock())

    async def forward_events(self, run_id: str, successor: str, unobserved: list[bytes]) -> None:
        """Deliver ``unobserved`` (events in the ended run's log it never saw) and
        then what is left in its inbox to the run that continues it, in order.

        Best effort across a crash: a worker dying between the end write and this
        loses these events (the window is one round trip per event)."""
        snap = await self.backend.read(run_id, log_from=-1)  # (the inbox; one record of the log)
        pending = [item.data for item in snap.inbox] if snap is not None else []
        for data in [*unobserved, *pending]:
            with contextlib.suppress(RunNotFound, RunFinished):
                await self.backend.deliver(successor, data, now=self.clock())

    async def cancel(self, run_id: str, *, revert: bool = False) -> None:
        await self.backend.request_cancel(run_id, now=self.clock(), revert=revert)

    async def resume(self, run_id: str) -> None:
        """Return a FAILED or CANCELLED run to PENDING, its log cut where the
        failure began (see ``_recovery.resume_point``): a worker replays it with
        the code it runs now, and the call that failed runs again."""
        snap = await self.backend.read(run_id)
        if snap is None:
            raise RunNotFound(run_id)
        run = snap.run
        if run.status not in _RESUMABLE:
            raise ClientError(
                f"run {run_id!r} is {run.status.value}: only a FAILED or CANCELLED run "
                "can be resumed"
            )
        keep = resume_point(decoded(run_id, snap.log))
        reopened = await self.backend.reopen(
            run_id, status=run.status, expected_len=run.log_len, keep_len=keep, now=self.clock()
        )
        if not reopened:
            raise ClientError(f"run {run_id!r} changed while being resumed; look at it again")

    async def fork(self, source: str, *, from_step: int, run_id: str) -> None:
        """Create ``run_id``: a run of ``source``'s workflow and kwargs whose log is
        ``source``'s before durable call ``from_step`` (``_recovery.fork_point``).
        The source is only read. ClientError if ``run_id`` exists already."""
        snap = await self.backend.read(source)
        if snap is None:
            raise RunNotFound(source)
        records = decoded(source, snap.log)
        cut = fork_point(records, from_step)
        start = {k: v for k, v in records[0].items() if k != "origin"}  # a run of its own
        start["fork"] = {"of": source, "step": from_step}
        now = self.clock()
        new = NewRun(
            run_id=run_id,
            workflow=snap.run.workflow,
            queue=snap.run.queue,
            first_record=self.encode(start, f"fork of {source!r}"),
            more_records=tuple(snap.log[1:cut]),
            state=R.published(records[1:cut]),
            priority=snap.run.priority,
            concurrency_key=snap.run.concurrency_key,
            created_at=now,
            due_at=now,
        )
        if not await self.backend.create_run(new):
            raise ClientError(f"fork: run {run_id!r} exists already; choose another run_id")

    async def claim(
        self,
        *,
        queue: str,
        workflows: Collection[str],
        limit: int,
        owner: str,
        lease: float,
        limits: QueueLimits | None = None,
    ) -> Claims:
        """Claim due runs of ``queue`` under its ``limits``; the result's
        ``held_until`` says when a rate limit lets the next one start."""
        got = await self.backend.claim_due(
            queue=queue,
            workflows=workflows,
            limit=limit,
            owner=owner,
            lease_seconds=lease,
            now=self.clock(),
            **({} if limits is None else {"limits": limits}),
        )
        return got if isinstance(got, Claims) else Claims(got)

    @property
    def knows_next_due(self) -> bool:
        """The store can say when the next run becomes claimable (see next_due)."""
        return isinstance(self.backend, KnowsNextDue)

    async def next_due(self, *, queue: str, workflows: Collection[str]) -> float | None:
        """When a run of ``workflows`` on ``queue`` next becomes claimable, if the
        store can say (None: it cannot, or no run waits for a time)."""
        if not isinstance(self.backend, KnowsNextDue):
            return None
        return await self.backend.next_due(queue=queue, workflows=workflows, now=self.clock())

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

    async def counts(self) -> RunCounts:
        """Runs per (workflow, status): counted by the store where it can (CountsRuns:
        every store of this package), else in one pass over ``list_runs`` pages."""
        if isinstance(self.backend, CountsRuns):
            return await self.backend.count_runs()
        found: RunCounts = {}
        before: tuple[float, str] | None = None
        while True:
            page = await self.backend.list_runs(RunQuery(limit=COUNT_PAGE, before=before))
            for run in page:
                found[run.workflow, run.status] = found.get((run.workflow, run.status), 0) + 1
            if len(page) < COUNT_PAGE:
                return found
            before = (page[-1].created_at, page[-1].run_id)

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

    async def details_log(self, run_id: str) -> tuple[RunRecord, list[R.Record]]:
        """The run and the records ``run_details`` draws on: its start and its
        ``start_child`` calls. A child can be anywhere in the log, so it is read
        whole, but only the records whose bytes name that primitive are decoded (a
        superset: the JSON of such a record holds ``"start_child"`` verbatim)."""
        snap = await self.backend.read(run_id)
        if snap is None:
            raise RunNotFound(run_id)
        return snap.run, [
            decode_record(run_id, i, data)
            for i, data in enumerate(snap.log)
            if i == 0 or b'"start_child"' in data
        ]

    async def read_log(self, run_id: str) -> tuple[RunRecord, list[R.Record]]:
        """The run and its whole decoded log, in one store read."""
        snap = await self.backend.read(run_id)
        if snap is None:
            raise RunNotFound(run_id)
        return snap.run, [decode_record(run_id, i, data) for i, data in enumerate(snap.log)]

    # -- the worker registry ---------------------------------------------------------

    async def register_worker(self, info: WorkerRecord) -> None:
        await self.backend.register_worker(info, now=self.clock())

    async def beat_worker(self, worker_id: str) -> bool:
        """False: the store has no entry for it (any more); register again."""
        return await self.backend.beat_worker(worker_id, now=self.clock())

    async def remove_worker(self, worker_id: str) -> None:
        await self.backend.remove_worker(worker_id)

    async def workers(self) -> list[WorkerInfo]:
        """The live workers, by id."""
        return [
            WorkerInfo(
                worker_id=w.worker_id,
                host=w.host,
                pid=w.pid,
                queues=w.queues,
                workflows=w.workflows,
                started_at=datetime.fromtimestamp(w.started_at, UTC),
                last_beat=datetime.fromtimestamp(w.last_beat, UTC),
            )
            for w in await self.backend.list_workers(now=self.clock())
        ]

    async def open_session(self, claim: Claim, lease: float) -> RunSession | None:
        snap = claim.snapshot
        if snap is None:  # the store did not read it with the claim
            snap = await self.backend.read(claim.run_id)
        if snap is None:
            return None
        return RunSession.loaded(self, claim, snap, lease)

    # -- a run's history, a page at a time -------------------------------------------

    async def history(
        self, run_id: str, *, limit: int | None, cursor: str | None
    ) -> tuple[RunRecord, list[HistoryEntry], str | None]:
        """One page of the run's timeline and the next page's cursor.

        A page is read from the store a slice at a time from where it starts (see
        ``PageScan``), the first slice a little over ``limit`` records, doubling
        while the page needs more; only the whole timeline (no ``limit``) or a
        cursor of an older version (``h<index>``) reads the whole log. Slices are
        separate reads: a compaction between them can mix two logs in one page."""
        at = parse_cursor(cursor)[1]
        if limit is None or at is None:
            run, records = await self.read_log(run_id)
            return run, *history_page(records, run=run_id, limit=limit, cursor=cursor)
        scan = PageScan(limit=limit, cursor=cursor)
        first: RunRecord | None = None
        size = 2 * limit + 16
        while not scan.done:
            run, raw = await self._log_slice(run_id, scan.end, scan.end + size)
            first = first or run
            for data in raw:
                scan.feed(decode_record(run_id, scan.end, data))
            if len(raw) < size:  # the log's end
                break
            size = min(2 * size, SCAN_MAX)
        for pos in scan.missing():  # events a receive on the page took before it
            _, raw = await self._log_slice(run_id, pos, pos + 1)
            if raw:
                scan.recall(pos, decode_record(run_id, pos, raw[0]))
        run = first or (await self._log_slice(run_id, 0, 0))[0]
        return run, *scan.page()

    async def _log_slice(self, run_id: str, start: int, stop: int) -> tuple[RunRecord, list[bytes]]:
        """The run and its records ``start <= pos < stop``; RunNotFound."""
        if isinstance(self.backend, PagesLog):
            found = await self.backend.read_log_page(run_id, start=start, stop=stop)
        else:  # a store that cannot read a slice: from start on, then cut
            snap = await self.backend.read(run_id, log_from=start)
            found = None if snap is None else (snap.run, snap.log[: max(0, stop - start)])
        if found is None:
            raise RunNotFound(run_id)
        return found
