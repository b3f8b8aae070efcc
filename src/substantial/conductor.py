"""The client: start runs, send events, wait for results, search; and host workers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar, overload

from ._events import checked_event
from ._export import HistoryFile, RunHistory
from ._handle import RunHandle
from ._hints import HintRelay
from ._history import History, RunDetails, run_details
from ._journal import DEFAULT_MAX_PAYLOAD, Clock, Journal, RunEnd, store_label, summarize
from ._latches import emit, is_latch
from ._pushdown import RunPage, decode_cursor, encode_cursor, narrowing
from ._queues import Queue, QueueRegistry, declared
from ._records import published
from ._schedules import tick_run_id
from ._supervision import Backoff, Outage, reraise_if_cancelling
from ._types import (
    RunStatus,
    RunSummary,
    ScheduleInfo,
    WorkerInfo,
    to_seconds,
)
from .backends import Backend, RunQuery, RunRecord, open_backend
from .errors import (
    BackendUnavailable,
    ClientError,
    ConfigurationError,
)
from .filters import compile_filter, uses_state
from .worker import Worker, WorkerOptions, WorkerTask, install_sigterm
from .workflow import Workflow, deadline_seconds, workflow_name

__all__ = ["Conductor", "RunHandle"]

R = TypeVar("R")
T = TypeVar("T")

log = logging.getLogger(__name__)


def _lease_default() -> float:
    raw = os.environ.get("SUBSTANTIAL_LEASE_SECONDS")
    if not raw:
        return 30.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(
            f"SUBSTANTIAL_LEASE_SECONDS must be a number, got {raw!r}"
        ) from None
    if value <= 0:
        raise ConfigurationError("SUBSTANTIAL_LEASE_SECONDS must be positive")
    return value


def _non_negative(value: timedelta | float, what: str) -> float:
    seconds = to_seconds(value)
    if not seconds >= 0:
        raise ClientError(f"{what} must be zero or more, got {value!r}")
    return seconds


class Conductor:
    """Entry point: ``Conductor(FSBackend("./logs"))`` or ``Conductor("sqlite:///state.db")``.

    ``None`` uses ``SUBSTANTIAL_BACKEND`` or SQLite under ``./.substantial/``.
    """

    def __init__(
        self,
        backend: Backend | str | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
        clock: Clock | None = None,
    ) -> None:
        # A store built here from a URL is ours to close; one passed in is the caller's.
        self._owns_backend = backend is None or isinstance(backend, str)
        self.backend: Backend = (
            open_backend(backend) if backend is None or isinstance(backend, str) else backend
        )
        self.journal = Journal(
            self.backend,
            max_payload_bytes=max_payload_bytes,
            label=store_label(backend),
            **({} if clock is None else {"clock": clock}),
        )
        self.workflows: dict[str, Workflow[Any]] = {}
        self.queues = QueueRegistry()
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._hints = HintRelay(self.journal)
        self._hints.add(self._wake_waiters)
        self.journal.watch_ends(self._ended)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._ends: dict[str, RunEnd] = {}  # ends this process's workers made, of awaited runs

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Conductor:
        await self._ensure_open()
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _ensure_open(self) -> None:
        if self._opened:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if not self._opened:
                await self.journal.open()
                self._hints.start()
                self._opened = True

    async def close(self) -> None:
        await self._hints.stop()
        if self._opened:
            if self._owns_backend:
                await self.journal.close()
            self._opened = False

    async def migrate(self) -> int | None:
        """Apply the store's schema migrations (opening it does too); returns its
        schema version, or None for a store without one (memory, files, Redis)."""
        await self._ensure_open()
        return await self.journal.migrate()

    async def _event_payload(self, run_id: str, name: str, value: Any) -> Any:
        """``value`` as event ``name`` of ``run_id`` is stored: checked against its
        workflow's declared events when this Conductor has that workflow (one read
        more, only if a registered workflow declares events)."""
        if all(wf.events is None for wf in self.workflows.values()):
            return value
        wf = self.workflows.get((await self.journal.get(run_id)).workflow)
        return value if wf is None else checked_event(wf, name, value)

    async def _summary_for(self, run: RunRecord, with_state: bool) -> RunSummary:
        """The run's summary, with what it published if a filter needs that: kept
        with the run by the store, or (a run from before the store kept it) read
        from its log."""
        summary = summarize(run)
        if not with_state or run.state is not None:  # the store keeps it with the run
            return summary
        _, records = await self.journal.read_log(run.run_id)
        return dataclasses.replace(summary, state=published(records))

    def _nudge(self) -> None:
        """Make this process's workers and waiters look at the store again."""
        self._hints.nudge()

    def _wake_waiters(self, run_id: str) -> None:
        targets = self._waiters.values() if not run_id else [self._waiters.get(run_id, set())]
        for events in targets:
            for ev in events:
                ev.set()

    def _ended(self, end: RunEnd) -> None:
        """This process's worker made ``end`` durable: a waiter for that run takes it
        as it is (kept until the run's last waiter leaves), with no read of the row."""
        if end.run_id in self._waiters:
            self._ends[end.run_id] = end
            self._wake_waiters(end.run_id)

    async def _patiently(self, op: Callable[[], Awaitable[T]]) -> T:
        """``op()``, retried with backoff while the store is unreachable (the
        caller's own timeout bounds the wait)."""
        backoff = Backoff()
        while True:
            try:
                return await op()
            except BackendUnavailable as exc:
                reraise_if_cancelling()
                log.debug("store unreachable while waiting (%s); retrying", exc)
                await backoff.sleep()

    # -- registration and workers ---------------------------------------------------

    def register(self, *workflows: Workflow[Any]) -> None:
        for wf in workflows:
            if not isinstance(wf, Workflow):
                raise ConfigurationError(
                    f"register() takes functions decorated with @workflow(), got {wf!r}"
                )
            known = self.workflows.get(wf.name)
            if known is not None and known.fn is not wf.fn:
                raise ConfigurationError(f"two different workflows are named {wf.name!r}")
            self.workflows[wf.name] = wf

    def queue(
        self,
        name: str,
        *,
        concurrency: int | None = None,
        rate: tuple[int, timedelta | float] | None = None,
        priority: bool = False,
    ) -> Queue:
        """Declare queue ``name``'s limits, which every claim of its runs obeys in
        the store, across all workers on all machines: ``concurrency`` runs at once
        (per ``start(concurrency_key=)``), ``rate=(limit, period)`` starts per
        period, ``priority`` ordering by ``start(priority=)``. Declare it where the
        workers and clients both see it; ``run(concurrency=)`` stays the limit of
        one worker."""
        return self.queues.declare(
            declared(name, concurrency=concurrency, rate=rate, priority=priority)
        )

    def run(
        self,
        *,
        queues: tuple[str, ...] | list[str] = ("default",),
        concurrency: int = 64,
        lease: timedelta | float | None = None,
        hot_wait: timedelta | float = 5.0,
        burst: bool = False,
        handle_sigterm: bool = True,
    ) -> asyncio.Task[None]:
        """Start a worker in this process as a background task.

        Cancelling the task stops the worker cleanly: leases are released and
        awaiting the task does not raise. ``burst=True`` returns once nothing is
        due (useful in tests and batch scripts).
        """
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        options = WorkerOptions(
            queues=tuple(queues),
            concurrency=concurrency,
            lease=_lease_default() if lease is None else to_seconds(lease),
            hot_wait=to_seconds(hot_wait),
            burst=burst,
        )
        worker = Worker(self.journal, dict(self.workflows), options, queues=self.queues)
        task = WorkerTask(lambda: self._serve(worker), name="substantial")
        if handle_sigterm and not burst:
            install_sigterm(task)
        return task

    async def _serve(self, worker: Worker) -> None:
        try:
            await self._open_for(worker)
            # Workers hear a hint before this process's result() waiters: a run that
            # takes the hinted event in place (and ends) has then moved on when they look.
            self._hints.add(worker.hint, first=True)
            try:
                await worker.run(hints_ready=self._hints.ready)
            finally:
                self._hints.remove(worker.hint)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # a cancelled worker ends normally: awaiting it is quiet

    async def _open_for(self, worker: Worker) -> None:
        """Open the store for a worker, waiting out an outage at start-up as a
        worker does mid-run: backoff, one log line when it starts, one when over."""
        outage = Outage(f"store {self.journal.label}")
        backoff = Backoff()
        while True:
            try:
                await self._ensure_open()
            except BackendUnavailable as exc:
                reraise_if_cancelling()
                outage.failed(exc)
                await backoff.sleep()
                continue
            outage.ok()
            return

    async def run_until_idle(
        self,
        *,
        queues: tuple[str, ...] | list[str] = ("default",),
        concurrency: int = 64,
        lease: timedelta | float | None = None,
        hot_wait: timedelta | float = 5.0,
    ) -> None:
        """Run a worker until no run is due (timers in the future are left alone)."""
        await self.run(
            queues=queues, concurrency=concurrency, lease=lease, hot_wait=hot_wait, burst=True
        )

    # -- client ---------------------------------------------------------------------

    @overload
    async def start(
        self,
        wf: Workflow[R],
        kwargs: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        queue: str = "default",
        connection: Any = None,
        timeout: timedelta | float | None = None,
        delay: timedelta | float | None = None,
        priority: int | None = None,
        concurrency_key: str | None = None,
    ) -> RunHandle[R]: ...
    @overload
    async def start(
        self,
        wf: str,
        kwargs: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        queue: str = "default",
        connection: Any = None,
        timeout: timedelta | float | None = None,
        delay: timedelta | float | None = None,
        priority: int | None = None,
        concurrency_key: str | None = None,
    ) -> RunHandle[Any]: ...
    async def start(
        self,
        wf: Workflow[Any] | str,
        kwargs: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        queue: str = "default",
        connection: Any = None,
        timeout: timedelta | float | None = None,
        delay: timedelta | float | None = None,
        priority: int | None = None,
        concurrency_key: str | None = None,
    ) -> RunHandle[Any]:
        """Start a run (idempotent on ``run_id``: the first start wins).

        ``connection`` (PostgreSQL): an open asyncpg connection whose transaction
        the run joins, so it exists iff that transaction commits. ``timeout``: the
        run's deadline from now (default: the workflow's ``@workflow(timeout=)``);
        a run still going then ends CANCELLED, saying so, and its descendants too.
        ``delay``: no worker claims the run before then (it is PENDING meanwhile);
        a deadline still counts from now. ``priority`` (lower first) and
        ``concurrency_key`` (the group the queue's concurrency counts) take effect
        on a queue declared with ``Conductor.queue``.
        """
        handle, _ = await self._start(
            wf, kwargs, run_id=run_id, queue=queue, connection=connection, timeout=timeout,
            delay=delay, priority=priority, concurrency_key=concurrency_key,
        )  # fmt: skip
        return handle

    async def _start(
        self,
        wf: Workflow[Any] | str,
        kwargs: Mapping[str, Any] | None,
        *,
        run_id: str | None,
        queue: str,
        connection: Any = None,
        timeout: timedelta | float | None = None,
        delay: timedelta | float | None = None,
        priority: int | None = None,
        concurrency_key: str | None = None,
    ) -> tuple[RunHandle[Any], bool]:
        """:meth:`start`, and whether this call made the run (False: ``run_id``
        existed, and nothing changed). The HTTP API answers 201 or 200 by it, which
        a look before the start cannot tell when two clients race."""
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ClientError(f"kwargs must be a dict of keyword arguments, got {kwargs!r}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ClientError("run_id must be a non-empty string")
        await self._ensure_open()
        rid = run_id or str(uuid.uuid4())
        name = workflow_name(wf)
        if timeout is not None:
            try:
                limit: float | None = deadline_seconds(timeout, "start(timeout=)")
            except ValueError as exc:
                raise ClientError(str(exc)) from None
        else:
            known = wf if isinstance(wf, Workflow) else self.workflows.get(name)
            limit = None if known is None else known.timeout
        created = await self.journal.create(
            run_id=rid,
            workflow=name,
            kwargs=dict(kwargs or {}),
            queue=queue,
            connection=connection,
            timeout=limit,
            delay=0.0 if delay is None else _non_negative(delay, "start(delay=)"),
            **self.queues.start_options(queue, priority, concurrency_key),
        )
        return RunHandle(self, rid), created

    def handle(self, run_id: str) -> RunHandle[Any]:
        return RunHandle(self, run_id)

    async def fork(
        self, source: str, /, *, from_step: int, run_id: str | None = None
    ) -> RunHandle[Any]:
        """A new run of ``source``'s workflow and kwargs whose log is ``source``'s up
        to (not including) durable call ``from_step`` (its sequence id, as ``show``
        numbers the steps); the events recorded before that point come along. The
        new run replays that prefix (its steps are not run again) and runs on from
        step ``from_step`` with the code the workers run now. ``source`` is left
        untouched. ``run_id`` defaults to a random UUID; an existing one is a
        ClientError. Unknown ``source``: RunNotFound."""
        await self._ensure_open()
        rid = str(uuid.uuid4()) if run_id is None else run_id
        if not rid:
            raise ClientError("fork: run_id must be a non-empty string")
        await self.journal.fork(source, from_step=from_step, run_id=rid)
        return RunHandle(self, rid)

    async def workers(self) -> list[WorkerInfo]:
        """The live workers of this store, by id: those whose last heartbeat is
        younger than their lease (a worker that stopped cleanly is gone at once)."""
        await self._ensure_open()
        return await self.journal.workers()

    async def served_by(
        self, summary: RunSummary, *, workers: Sequence[WorkerInfo] | None = None
    ) -> bool:
        """Whether some live worker serves ``summary``'s workflow on its queue.

        False for a PENDING run means it waits for a worker that is not there (a
        mistyped workflow name, a queue nobody serves, every worker down). Pass
        ``workers`` (from :meth:`workers`) to check a page of runs with one lookup."""
        found = await self.workers() if workers is None else workers
        return any(w.serves(summary.workflow, summary.queue) for w in found)

    async def search(
        self,
        workflow_name: str | Workflow[Any] | None,
        filter: Mapping[str, Any] | None = None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> list[RunSummary]:
        """Runs matching ``filter`` (the Metatype grammar; see filters), newest first.

        ``limit`` caps how many are returned; ``cursor`` continues after a page
        (see :meth:`search_page`, which also returns the next cursor)."""
        if limit is not None:
            return (await self.search_page(workflow_name, filter, limit=limit, cursor=cursor)).runs
        out: list[RunSummary] = []
        while True:
            page = await self.search_page(workflow_name, filter, limit=500, cursor=cursor)
            out += page.runs
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    async def search_page(
        self,
        workflow_name: str | Workflow[Any] | None,
        filter: Mapping[str, Any] | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> RunPage:
        """One page of :meth:`search`: at most ``limit`` runs and the cursor of the
        next page (None when this is the last). The store filters what it can
        (status, run id and time terms; see ``_pushdown``); the filter decides."""
        if limit < 1:
            raise ClientError(f"limit must be at least 1, got {limit}")
        pred = compile_filter(filter)
        with_state = uses_state(filter)
        narrow = narrowing(filter)
        after = decode_cursor(cursor)
        await self._ensure_open()
        if narrow.matches_nothing:
            return RunPage(runs=[], next_cursor=None)
        name = None if workflow_name is None else globals()["workflow_name"](workflow_name)
        if name is None:  # every workflow's runs but the latches of named events
            wanted = pred
            pred = lambda s: not is_latch(s.workflow) and wanted(s)  # noqa: E731
        batch = max(limit, 100)
        found: list[RunSummary] = []
        while True:
            query = RunQuery(workflow=name, limit=batch, before=after, **narrow.query_fields())
            runs = await self.journal.list_runs(query)
            last_batch = len(runs) < batch
            for i, run in enumerate(runs):
                after = (run.created_at, run.run_id)
                summary = await self._summary_for(run, with_state)
                if pred(summary):
                    found.append(summary)
                    if len(found) == limit:
                        more = not last_batch
                        for later in runs[i + 1 :] if not more else ():
                            if pred(await self._summary_for(later, with_state)):
                                more = True
                                break
                        return RunPage(
                            runs=found, next_cursor=encode_cursor(after) if more else None
                        )
            if last_batch:
                return RunPage(runs=found, next_cursor=None)

    async def counts(self) -> dict[str, dict[RunStatus, int]]:
        """How many runs each workflow has in each status, counted by the store (an
        index on SQLite and PostgreSQL, counters kept with each status change on
        Redis, a scan on the memory and file stores). Every workflow registered
        here or with runs in the store is a key; each maps every status to its
        count, zeros included. A run is counted once, in its current status."""
        await self._ensure_open()
        found = {name: dict.fromkeys(RunStatus, 0) for name in self.workflows}
        for (name, status), n in (await self.journal.counts()).items():
            if is_latch(name):
                continue  # a named event's latch: bookkeeping, not a run of the user's
            found.setdefault(name, dict.fromkeys(RunStatus, 0))[status] = n
        return found

    async def details(self, run_id: str) -> RunDetails:
        """Run ``run_id``'s summary, start kwargs and children (one store read).
        Raises RunNotFound."""
        await self._ensure_open()
        run, records = await self.journal.details_log(run_id)
        return run_details(summarize(run), records)

    def schedules(self, count: int = 3) -> list[ScheduleInfo]:
        """The registered workflows that have a schedule, with their next ``count``
        ticks on this Conductor's clock (a worker serving them starts each one)."""
        out = []
        for name, wf in sorted(self.workflows.items()):
            if wf.schedule is None:
                continue
            ticks, t = [], self.journal.clock()
            for _ in range(count):
                t = wf.schedule.next_after(t)
                ticks.append(t)
            out.append(
                ScheduleInfo(
                    workflow=name,
                    schedule=wf.schedule.describe(),
                    overlap=wf.schedule.overlap,
                    next_ticks=[datetime.fromtimestamp(x, UTC) for x in ticks],
                    next_run_ids=[tick_run_id(name, x) for x in ticks],
                )
            )
        return out

    async def emit_event(self, name: str, payload: Any = None) -> bool:
        """Set named event ``name`` to ``payload`` for every run that waits for it
        (``c.wait_for_event``), now or later; True if this call set it (the first
        emit wins, later ones change nothing but wake the waiters again)."""
        await self._ensure_open()
        return await emit(self.journal, name, payload)  # (the latch's inbox encodes it)

    async def export(self, run_ids: Sequence[str]) -> HistoryFile:
        """The histories of ``run_ids`` (their logs as JSON records), as
        ``substantial export`` writes them; ``substantial.testing.replay`` reads
        them. RunNotFound if one does not exist."""
        await self._ensure_open()
        runs = []
        for run_id in run_ids:
            run, records = await self.journal.read_log(run_id)
            runs.append(RunHistory.of(run, records))
        return HistoryFile.of(runs)

    async def unfinished_runs(self, workflow: str | None = None) -> list[str]:
        """The ids of every run not yet ended (of ``workflow``, if given), oldest
        first: what a deploy's new code will replay."""
        await self._ensure_open()
        waiting = frozenset(s for s in RunStatus if not s.is_terminal)
        found = await self.journal.list_runs(RunQuery(workflow=workflow, statuses=waiting))
        return [
            r.run_id for r in reversed(found) if workflow is not None or not is_latch(r.workflow)
        ]

    async def history(
        self, run_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> History:
        """Run ``run_id``'s timeline (see ``_history``): at most ``limit`` entries
        from ``cursor`` (a previous page's ``next_cursor``), with the run's summary.
        This run only, not the runs it continued into. Raises RunNotFound."""
        await self._ensure_open()
        run, entries, next_cursor = await self.journal.history(run_id, limit=limit, cursor=cursor)
        return History(
            run_id=run_id, entries=entries, next_cursor=next_cursor, summary=summarize(run)
        )

    async def _wait_terminal(self, run_id: str) -> RunEnd:
        """How the run ended, once it has. Subscribed before each look (no lost
        wake-up); a store outage is waited out (the caller's timeout decides)."""
        await self._patiently(self._ensure_open)
        ev = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(ev)
        poll = self.journal.poll_interval
        try:
            await self._hints.ready()
            while True:
                ev.clear()
                end = self._ends.get(run_id)
                if end is not None:
                    return end
                run = await self._patiently(lambda: self.journal.get(run_id))
                if run.status.is_terminal:
                    return RunEnd.of(run)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll):
                        await ev.wait()
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    del self._waiters[run_id]
                    self._ends.pop(run_id, None)
