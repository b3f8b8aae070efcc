"""A Conductor and a worker on a virtual clock, for tests of workflows.

Time is a number the environment owns. It stands still while any run can make
progress, so a test sees every step that is due now run before anything else
happens. It moves only when every run is waiting:

* while a client awaits a result (``await handle.result()``), straight to the
  next due timer, again and again, so a 30-day sleep, a receive's 7-day timeout
  and hour-long retry backoffs pass at once;
* on ``await env.advance(duration)``, through each due timer up to that point.

``await env.run_until_idle()`` runs what is due now and never moves time: a
test can look at a sleeping run, send it an event, then advance.

"Every run is waiting" is read from the store, the one place that knows: no run
of this environment's workflows holds a lease, and none is due at the current
time. The worker never waits in place (``hot_wait`` 0): each wait hands its run
back to the store, where the environment can see it and its due time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from .._history import HistoryEntry
from .._journal import RunEnd
from .._supervision import reraise_if_cancelling
from .._types import RunStatus, Seconds, to_seconds
from ..backends import Backend, RunQuery, RunRecord
from ..conductor import Conductor
from ..worker import Worker
from ..workflow import Workflow

__all__ = ["TestEnvironment"]

_WAITING = frozenset(s for s in RunStatus if not s.is_terminal)
_FALLBACK = 0.05  # a look at the store this often too: claims are not hinted


class _VirtualClock:
    """The environment's time: read by the engine, moved only forward, by it."""

    def __init__(self, start: float) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def move_to(self, t: float) -> None:
        self._now = max(self._now, t)


class _TestConductor(Conductor):
    """A Conductor whose result waits tell the environment: time may skip then."""

    def __init__(
        self,
        backend: Backend | str,
        *,
        clock: _VirtualClock,
        on_wait: Callable[[str], contextlib.AbstractContextManager[None]],
        on_change: Callable[[str], None],
    ) -> None:
        super().__init__(backend, clock=clock)
        self._on_wait = on_wait
        self._hints.add(on_change)
        self.worker: Worker | None = None
        self.serving = asyncio.Event()  # its worker serves

    async def _wait_terminal(self, run_id: str) -> RunEnd:
        with self._on_wait(run_id):
            return await super()._wait_terminal(run_id)

    async def _serve(self, worker: Worker) -> None:
        self.worker = worker  # the environment asks it whether it is still driving a run

        async def mark() -> None:
            await worker.ready.wait()
            self.serving.set()

        marking = asyncio.ensure_future(mark())
        try:
            await super()._serve(worker)
        finally:
            marking.cancel()


class TestEnvironment:
    """``async with TestEnvironment(wf, ...) as env``: ``env.conductor`` has the
    workflows registered and a worker serving them on a virtual clock.

    ``backend`` is a store URL or object (default ``memory://``, private to the
    test); ``start`` the clock's first reading (default: now). See the module's
    docstring for when time moves."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(
        self,
        *workflows: Workflow[Any],
        backend: Backend | str = "memory://",
        start: datetime | None = None,
        queues: tuple[str, ...] = ("default",),
        concurrency: int = 64,
    ) -> None:
        if start is not None and start.tzinfo is None:
            raise ValueError("TestEnvironment(start=) needs an aware datetime (e.g. tzinfo=UTC)")
        self._clock = _VirtualClock(time.time() if start is None else start.timestamp())
        self._workflows = workflows
        self._backend = backend
        self._queues = queues
        self._concurrency = concurrency
        self._awaited: Counter[str] = Counter()  # runs whose result a client awaits
        self._skip = asyncio.Event()  # set while a client awaits a result
        self._changed = asyncio.Event()  # a hint arrived since the last look
        self._conductor: _TestConductor | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> TestEnvironment:
        conductor = _TestConductor(
            self._backend, clock=self._clock, on_wait=self._result_wait, on_change=self._on_hint
        )
        conductor.register(*self._workflows)
        await conductor.__aenter__()
        self._conductor = conductor
        worker = conductor.run(
            queues=self._queues,
            concurrency=self._concurrency,
            hot_wait=0,
            handle_sigterm=False,
        )
        keeper = asyncio.get_running_loop().create_task(self._keep(), name="substantial-clock")
        self._tasks = [worker, keeper]
        await self._worker_serving(worker)
        return self

    async def _worker_serving(self, task: asyncio.Task[None]) -> None:
        """Until the worker serves (its scheduler counts ticks from here on)."""
        assert self._conductor is not None
        ready = asyncio.ensure_future(self._conductor.serving.wait())
        done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            await task  # it failed to start: say why

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._conductor is not None:
            await self._conductor.close()
            self._conductor = None

    @property
    def conductor(self) -> Conductor:
        """The Conductor to start runs with and send to (its worker runs already)."""
        if self._conductor is None:
            raise RuntimeError("use the TestEnvironment inside `async with`")
        return self._conductor

    # -- time -----------------------------------------------------------------------

    def now(self) -> datetime:
        """The virtual time (aware UTC): what ``c.now()`` in a run would record."""
        return datetime.fromtimestamp(self._clock(), UTC)

    async def run_until_idle(self) -> None:
        """Return once every run is waiting (for a time, an event, a child) or has
        ended. Time does not move."""
        await self._until_quiet()

    async def advance(self, duration: timedelta | Seconds) -> None:
        """Move time forward by ``duration``: each timer due on the way fires at its
        own time, and the runs it wakes go as far as they can before the next."""
        target = self._clock() + to_seconds(duration)
        while True:
            due = await self._until_quiet()
            if due is None or due > target:
                break
            self._move_to(due)
        self._move_to(target)
        await self._until_quiet()

    # -- stubs and history ------------------------------------------------------------

    def stub(self, name: str, value: Any) -> None:
        """Replace the effect of every save named ``name`` (its ``name=``, or its
        function's name) with ``value``: a plain value is returned; an exception
        (instance or class) is raised by each attempt, so the save's retry policy
        applies; a callable (sync or async, no arguments) is called. Runs record
        the stand-in's outcome as they would the real one's."""
        effect: Callable[[], Any]
        if isinstance(value, BaseException) or (
            isinstance(value, type) and issubclass(value, BaseException)
        ):
            error = value

            def effect() -> Any:
                raise error

        elif callable(value):
            effect = value
        else:

            def effect() -> Any:
                return value

        self.conductor.journal.stub(name, effect)

    def unstub(self, name: str) -> None:
        """The real effect of the saves named ``name`` again."""
        self.conductor.journal.stub(name, None)

    async def history(self, run_id: str) -> list[HistoryEntry]:
        """The run's whole timeline (``Conductor.history``), for assertions."""
        return (await self.conductor.history(run_id)).entries

    # -- inside ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _result_wait(self, run_id: str) -> Iterator[None]:
        self._awaited[run_id] += 1
        self._skip.set()
        try:
            yield
        finally:
            self._awaited[run_id] -= 1
            if not self._awaited[run_id]:
                del self._awaited[run_id]
            if not self._awaited:
                self._skip.clear()

    def _on_hint(self, run_id: str) -> None:
        self._changed.set()

    def _move_to(self, t: float) -> None:
        if t > self._clock():
            self._clock.move_to(t)
            self.conductor._nudge()  # the worker's next claim sees what is due now

    async def _look(self) -> tuple[bool, float | None]:
        """Whether every run is waiting, and the earliest time one is due. The
        worker must be idle too: a run's driver may still act after its last write
        (a deadline's cancel cascades to the children after the run ended)."""
        worker = None if self._conductor is None else self._conductor.worker
        if worker is not None and (worker.active_runs or worker.scheduler.behind(self._clock())):
            return False, None
        served = set(self.conductor.workflows)
        held = None if worker is None else worker.held_until
        runs = await self.conductor.journal.list_runs(RunQuery(statuses=_WAITING))
        now = self._clock()
        due: float | None = None
        for run in runs:
            if run.workflow not in served or run.queue not in self._queues:
                continue
            if run.lease_owner is not None:
                return False, None
            if run.due_at is not None:
                wakes = run.due_at
                if wakes <= now:
                    if held is None or held <= now or not self._rate_held(run):
                        return False, None
                    wakes = held  # due, but its queue's rate lets it start only then
                due = wakes if due is None else min(due, wakes)
        tick = None if worker is None else worker.scheduler.next_tick()
        if tick is not None:
            due = tick if due is None else min(due, tick)
        return True, due

    def _rate_held(self, run: RunRecord) -> bool:
        """Whether ``run`` waits for its queue's rate limit (it never started, and
        its queue has one): the worker's last claim pass held such runs back."""
        limits = self.conductor.queues.limits(run.queue)
        return run.started_at is None and limits is not None and limits.rate is not None

    async def _until_quiet(self) -> float | None:
        """Wait until every run is waiting; returns the next due time (or None)."""
        while True:
            self._changed.clear()
            quiet, due = await self._look()
            reraise_if_cancelling()  # a store's driver may have eaten a cancel
            if quiet:
                return due
            await self._changed_or_fallback()

    async def _changed_or_fallback(self) -> None:
        """Until a hint arrives, or the fallback look is due. A cancel that lands
        as the timeout fires is not lost (3.11's asyncio.timeout can turn it into
        the TimeoutError suppressed here)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FALLBACK):
                await self._changed.wait()
        reraise_if_cancelling()

    async def _awaited_ended(self) -> bool:
        """Whether every run a client awaits has ended: its waiter has yet to see
        it (a hint on its way), and time must not jump in the meantime."""
        journal = self.conductor.journal
        for run_id in list(self._awaited):
            run = await journal.get_or_none(run_id)
            if run is None or not run.status.is_terminal:
                return False
        return True

    async def _keep(self) -> None:
        """While a client awaits a result: whenever every run waits, jump to the
        next due timer (with none due, wait for something to change)."""
        while True:
            reraise_if_cancelling()
            await self._skip.wait()
            due = await self._until_quiet()
            if not self._skip.is_set():
                continue
            if due is None or await self._awaited_ended():
                self._changed.clear()
                await self._changed_or_fallback()
                continue
            self._move_to(due)
