"""The worker: claims due runs, holds their leases, drives them, wakes on hints.

One loop claims work; each claimed run is driven by its own task; one
heartbeat task renews every held lease at a third of the lease time. Wake-ups
come from the store's hint stream (and local timers for the runs this worker
put to sleep); polling happens only when the store cannot signal other
processes, at its ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from . import telemetry
from ._journal import Journal, RunSession
from ._queues import QueueRegistry
from ._runner import drive
from ._scheduler import Scheduler
from ._supervision import Backoff, Outage, reraise_if_cancelling, supervise
from .backends import Claim, WorkerRecord
from .errors import BackendError, BackendUnavailable
from .workflow import Workflow

# An idle worker on a store whose hints reach every process (PostgreSQL, Redis) polls
# DEEP_IDLE_AFTER times, then sleeps until the next due time it is told (or a hint),
# looking at the store at least every MAX_IDLE seconds (hints usually come first).
DEEP_IDLE_AFTER = 3
MAX_IDLE = 30.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerOptions:
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 64
    lease: float = 30.0  # seconds
    hot_wait: float = 5.0  # waits shorter than this continue in place
    idle_poll: float | None = None  # override the store's poll interval
    burst: bool = False  # stop when nothing is due (handy in tests and scripts)


class Worker:
    def __init__(
        self,
        journal: Journal,
        workflows: Mapping[str, Workflow[Any]],
        options: WorkerOptions,
        *,
        queues: QueueRegistry | None = None,
    ) -> None:
        self.journal = journal
        self.workflows = workflows
        self.options = options
        self.queues = QueueRegistry() if queues is None else queues  # limits, read per claim
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._active: dict[str, tuple[RunSession | None, asyncio.Task[None]]] = {}
        self._tokens: dict[str, int] = {}  # lease token of each active run, from its claim
        self._kick = asyncio.Event()
        self._beat_now = asyncio.Event()  # a slow claim pass: renew what it claimed early
        self._early: set[str] = set()  # hints for runs whose session is still loading
        self._timers: list[float] = []  # due times this worker handed back
        self._outage = Outage(f"store {journal.label}", log)
        self.scheduler = Scheduler(journal, workflows)  # starts the runs of schedules' ticks
        self.ready = asyncio.Event()  # set once it serves: subscribed, side tasks running
        # when its last claim pass found runs held back by a queue's rate limit: the
        # earliest time one may start (a virtual clock jumps there, not past them)
        self.held_until: float | None = None
        self._started_at = journal.clock()

    @property
    def active_runs(self) -> int:
        """Runs this worker is driving now (claimed and not yet handed back)."""
        return len(self._active)

    # -- hints ------------------------------------------------------------------

    def hint(self, run_id: str) -> None:
        """Something changed for ``run_id`` (or "" = anything): wake the right party."""
        entry = self._active.get(run_id) if run_id else None
        if not run_id:
            self.scheduler.kick()  # look again at everything, the schedules too
        if entry is None:
            self._kick.set()
        elif entry[0] is not None:
            entry[0].notify()
        else:
            self._early.add(run_id)  # claimed, session still loading: tell it once ready

    # -- main loop -----------------------------------------------------------------

    async def run(self, *, hints_ready: Callable[[], Awaitable[None]]) -> None:
        """Serve until cancelled (or, in burst mode, until nothing is due).

        ``hints_ready`` returns once the store's hint subscription is live; the
        first claim waits for it, so a run made due at any moment is either seen
        by that claim or hinted after it (guarantee 7)."""
        await hints_ready()
        await self._register()
        heartbeat = asyncio.create_task(
            supervise("heartbeat", self._heartbeat), name="substantial-heartbeat"
        )
        registry = asyncio.create_task(
            supervise("registry", self._registry_beats), name="substantial-registry"
        )
        side = [heartbeat, registry]
        if self.scheduler.active:  # only workers that serve a scheduled workflow
            side.append(
                asyncio.create_task(
                    supervise("scheduler", self.scheduler.run), name="substantial-scheduler"
                )
            )
        self._log_start()
        self.ready.set()
        try:
            await self._loop()
        finally:
            log.info("worker %s stopping: handing back %d runs", self.owner, len(self._active))
            for task in side:
                task.cancel()
            tasks = [t for _, t in self._active.values()]
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in side:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._unregister()
            log.info("worker %s stopped", self.owner)

    def _log_start(self) -> None:
        opts = self.options
        log.info(
            "worker %s started: store %s, queues %s, workflows %s, concurrency %d, lease %.1fs",
            self.owner,
            self.journal.label,
            ", ".join(opts.queues),
            ", ".join(sorted(self.workflows)) or "(none)",
            opts.concurrency,
            opts.lease,
            extra={
                "worker": self.owner,
                "store": self.journal.label,
                "queues": list(opts.queues),
                "workflows": sorted(self.workflows),
                "concurrency": opts.concurrency,
                "lease": opts.lease,
            },
        )

    # -- the registry ------------------------------------------------------------

    async def _register(self) -> None:
        """Put this worker in the store's registry (``Conductor.workers()``). Not
        fatal when the store is out: the heartbeat's next beat registers then."""
        opts = self.options
        info = WorkerRecord(
            worker_id=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=opts.queues,
            workflows=tuple(sorted(self.workflows)),
            started_at=self._started_at,
            lease_seconds=opts.lease,
        )
        try:
            await self.journal.register_worker(info)
        except BackendError as exc:
            reraise_if_cancelling()
            log.warning("worker %s: registering in the store failed (%r)", self.owner, exc)

    async def _unregister(self) -> None:
        """Leave the registry on a clean stop. Best effort and bounded: an entry left
        behind ages out after the lease anyway, and a stop must not hang on it."""
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(max(self.options.lease, 1.0)):
                await asyncio.shield(self.journal.remove_worker(self.owner))

    async def _registry_beats(self) -> None:
        """Beat the registry entry each lease/3, the heartbeat's period, in a task of
        its own: a slow or failing registry write must never delay a lease renewal."""
        interval = self.options.lease / 3
        while True:
            await asyncio.sleep(interval)
            await self._beat_registry()
            reraise_if_cancelling()  # a store client may have eaten a cancel: stop anyway

    async def _beat_registry(self) -> None:
        """One small write; an entry that is gone (aged out during an outage, or
        removed) is written again whole."""
        try:
            if not await self.journal.beat_worker(self.owner):
                await self._register()
        except BackendError as exc:
            reraise_if_cancelling()
            log.debug("worker %s: registry beat failed (%r)", self.owner, exc)

    async def _loop(self) -> None:
        opts = self.options
        poll = opts.idle_poll if opts.idle_poll is not None else self.journal.poll_interval
        backoff = Backoff()
        quiet = 0  # polls in a row that found nothing and were not woken by a hint
        while True:
            reraise_if_cancelling()
            self._kick.clear()
            free = opts.concurrency - len(self._active)
            got = 0
            if free > 0:
                try:
                    started = self.journal.clock()  # the clock leases run on
                    held: list[float] = []
                    for queue in opts.queues:
                        claims = await self.journal.claim(
                            queue=queue,
                            workflows=list(self.workflows),
                            limit=free - got,
                            owner=self.owner,
                            lease=opts.lease,
                            limits=self.queues.limits(queue),
                        )
                        for c in claims:
                            self._start(c)
                        got += len(claims)
                        if claims.held_until is not None:  # a rate limit frees a start then
                            heapq.heappush(self._timers, claims.held_until)
                            held.append(claims.held_until)
                    self.held_until = min(held, default=None)
                    if got and self.journal.clock() - started > opts.lease / 6:
                        # the first runs of a slow pass have spent part of their lease
                        # waiting for it; the next beat may be a third of a lease away
                        self._beat_now.set()
                    backoff.reset()
                    self._outage.ok()
                except Exception as exc:  # the loop must outlive any store hiccup
                    reraise_if_cancelling()
                    if isinstance(exc, BackendUnavailable):
                        self._outage.failed(exc)
                    else:
                        log.error("claim failed (%r); retrying", exc, exc_info=True)
                    await backoff.sleep()
                    continue
            if got and got >= free:
                continue  # there may be more due right now
            if opts.burst and not self._active and not got:
                return
            reraise_if_cancelling()  # a driver may have eaten a cancel during the claim
            wait = poll
            if quiet >= DEEP_IDLE_AFTER and opts.idle_poll is None and not got and free > 0:
                # (a full worker waits for a freed slot, which kicks it, or the poll)
                wait = await self._until_next_due(poll)
            woken = await self._idle(wait)
            quiet = 0 if woken or got else quiet + 1

    async def _until_next_due(self, poll: float | None) -> float | None:
        """Deep idle, on a store whose hints reach every process: sleep until the
        next run this worker serves becomes claimable (a timer, an expiring lease)
        or a hint comes, looking at the store at least every MAX_IDLE seconds,
        instead of polling every ``poll``. The store can not say: ``poll``."""
        if not self.journal.knows_next_due:
            return poll
        try:
            dues = [
                await self.journal.next_due(queue=q, workflows=list(self.workflows))
                for q in self.options.queues
            ]
        except BackendError as exc:
            reraise_if_cancelling()
            log.debug("worker %s: next due time unknown (%r)", self.owner, exc)
            return poll
        now = self.journal.clock()
        known = [
            self._wake_for(queue, due, now, poll)
            for queue, due in zip(self.options.queues, dues, strict=True)
            if due is not None
        ]
        if not known:
            return MAX_IDLE
        return min(MAX_IDLE, max(min(known) - now, 0.0) + 0.001)

    def _wake_for(self, queue: str, due: float, now: float, poll: float | None) -> float:
        """When to look at ``queue`` again, its next run claimable at ``due``. A run
        due already that the last claim left is held back by the queue's limits:
        a freed slot is hinted, a rate's window has its timer, and a dead
        worker's slot comes back by the poll (looking at once would spin)."""
        if due > now or self.queues.limits(queue) is None:
            return due
        return now + (MAX_IDLE if poll is None else poll)

    async def _idle(self, poll: float | None) -> bool:
        """Wait for a kick (a hint, a freed slot), a local timer or ``poll``
        seconds; True if kicked."""
        now = self.journal.clock()
        while self._timers and self._timers[0] <= now:
            heapq.heappop(self._timers)
        timeout = poll
        if self._timers:
            until_timer = max(self._timers[0] - now, 0.0) + 0.001
            timeout = until_timer if timeout is None else min(timeout, until_timer)
        if self.options.burst:
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that
            # lands as the kick fires, and the worker would never stop.
            async with asyncio.timeout(timeout):
                await self._kick.wait()
        return self._kick.is_set()

    def _start(self, claim: Claim) -> None:
        old = self._active.get(claim.run_id)
        if old is not None:  # our own lease expired and we claimed it again: the new
            old[1].cancel()  # claim's token fences the old task; stop it
        task = asyncio.create_task(self._drive(claim), name=f"substantial-run-{claim.run_id}")
        self._active[claim.run_id] = (None, task)
        self._tokens[claim.run_id] = claim.token
        telemetry.claimed()

    async def _drive(self, claim: Claim) -> None:
        session: RunSession | None = None
        if claim.snapshot is None:
            # the session's first read is sent after every hint heard so far (the
            # run's own creation hint, often): it sees what they announce
            self._early.discard(claim.run_id)
        try:
            session = await self.journal.open_session(claim, self.options.lease)
            if session is None:
                return
            me = asyncio.current_task()
            assert me is not None
            self._active[claim.run_id] = (session, me)
            if claim.run_id in self._early:
                self._early.discard(claim.run_id)
                session.notify()
            wf = self.workflows[session.run.workflow]
            due = await telemetry.run_stretch(
                session, wf.name, drive(session, wf, hot_wait=self.options.hot_wait)
            )
            if due is not None:
                heapq.heappush(self._timers, due)
            elif session.released and self.scheduler.active:
                await self.scheduler.run_ended(wf.name)  # a tick held back may start now
        except asyncio.CancelledError:
            if session is not None and session.lost is None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(session.hand_back())
            raise
        except BackendError as exc:
            reraise_if_cancelling()
            if isinstance(exc, BackendUnavailable):
                self._outage.failed(exc)  # one line per outage, not one per run
                log.debug("run %s abandoned: %s", claim.run_id, exc)
            else:
                log.warning("run %s abandoned: %s", claim.run_id, exc)
        except Exception:
            reraise_if_cancelling()
            log.exception("run %s: unexpected engine error", claim.run_id)
        finally:
            entry = self._active.get(claim.run_id)
            if entry is not None and entry[1] is asyncio.current_task():
                self._early.discard(claim.run_id)
                del self._active[claim.run_id]
                del self._tokens[claim.run_id]
            self._kick.set()

    async def _heartbeat(self) -> None:
        """Renew every held lease each lease/3, all in one store call.

        One call, not one per run: under load, dozens of single renewals queue for
        the store's connections and the last ones land after their lease expired.
        The next beat is timed from this one's start, so a slow renewal does not
        stretch the period either. The first beat is at once: a heartbeat restarted
        after a failure must not leave the leases unrenewed for another period. A
        claim pass that took long asks for a beat at once: the leases of the runs it
        claimed first have been running since it began."""
        interval = self.options.lease / 3
        clock = asyncio.get_running_loop().time
        next_beat = clock()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), max(next_beat - clock(), 0.0))
            self._beat_now.clear()
            # timed from this beat (an early one renews everything just the same)
            next_beat = max(min(next_beat, clock()) + interval, clock())
            held = {  # loading runs too: a slow first read must not outlive the lease
                run_id: (session, task)
                for run_id, (session, task) in self._active.items()
                if session is None or (session.lost is None and not session.released)
            }
            if held:
                await self._renew(held)
                reraise_if_cancelling()  # a driver may have eaten a cancel

    async def _renew(self, held: dict[str, tuple[RunSession | None, asyncio.Task[None]]]) -> None:
        try:
            still = await self.journal.renew(
                {run_id: self._tokens[run_id] for run_id in held}, self.options.lease
            )
        except BackendUnavailable as exc:  # store hiccup: the next beat tries again
            self._outage.failed(exc)
            return
        except BackendError as exc:
            log.warning("heartbeat for %d runs failed: %r", len(held), exc)
            return
        self._outage.ok()
        for run_id, (_, task) in held.items():
            entry = self._active.get(run_id)
            if run_id in still or entry is None or entry[1] is not task:
                continue  # held, or ended (or re-claimed) while we renewed
            session = entry[0]  # it may have finished loading meanwhile
            if session is None:
                log.warning("run %s: lease lost while loading; abandoning", run_id)
                task.cancel()
            elif not session.released and session.lost is None:
                log.warning("run %s: lease lost to another worker; abandoning", run_id)
                session.lease_lost()
                task.cancel()


class WorkerTask(asyncio.Task[None]):
    """The task ``Conductor.run()`` returns. Cancelling it stops the worker and
    awaiting it returns None, also when the cancel comes before the task took its
    first step: a coroutine that never began cannot catch that cancel (it would
    be raised from ``await``), so such a cancel makes the task end as it starts."""

    def __init__(self, serve: Callable[[], Coroutine[Any, Any, None]], *, name: str) -> None:
        self._began = False
        self._stop_at_start = False
        super().__init__(self._begin(serve), name=name)

    async def _begin(self, serve: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._began = True
        if not self._stop_at_start:
            await serve()

    def cancel(self, msg: Any = None) -> bool:
        if self._began or self.done():
            return super().cancel(msg)
        self._stop_at_start = True
        return True


def install_sigterm(task: asyncio.Task[Any]) -> None:
    """On SIGTERM: stop the worker gracefully (releasing leases), then exit as
    SIGTERM would have. Only when nobody else handles SIGTERM."""
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        loop = asyncio.get_running_loop()
    except (ValueError, RuntimeError):
        return

    def on_term() -> None:
        loop.remove_signal_handler(signal.SIGTERM)

        def exit_after(_: asyncio.Task[Any]) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        task.add_done_callback(exit_after)
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_term)
    except (ValueError, RuntimeError, NotImplementedError):
        return
