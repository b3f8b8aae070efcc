"""A worker's scheduler: starts the runs of its scheduled workflows' ticks.

A side task of the worker (supervised like the heartbeat). It wakes at the next
tick of any of its workflows (or when the worker is nudged: a test clock that
moved), starts the run of every tick that has come, and goes back to sleep. See
``_schedules`` for why many workers doing this start each tick once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from ._journal import Journal
from ._schedules import SCHEDULED_QUEUE, tick_kwargs, tick_prefix, tick_run_id
from ._supervision import reraise_if_cancelling
from ._types import RunStatus
from .backends import RunQuery
from .workflow import Workflow

log = logging.getLogger(__name__)

_MAX_SLEEP = 60.0  # look again at least this often (a clock that jumped)
_WAITING = frozenset(s for s in RunStatus if not s.is_terminal)


class Scheduler:
    """The ticks of ``workflows`` (those with a schedule) on ``journal``'s clock."""

    def __init__(self, journal: Journal, workflows: Mapping[str, Workflow[Any]]) -> None:
        self._journal = journal
        self._scheduled = {n: wf for n, wf in workflows.items() if wf.schedule is not None}
        now = journal.clock()
        self._seen = {  # workflow -> ticks up to here are handled (catchup: from before)
            n: now - wf.schedule.catchup
            for n, wf in self._scheduled.items()
            if wf.schedule is not None
        }
        self._buffered: dict[str, float] = {}  # workflow -> a tick held back (buffer_one)
        self._kick = asyncio.Event()

    @property
    def active(self) -> bool:
        return bool(self._scheduled)

    def kick(self) -> None:
        """Look now (the clock may have moved)."""
        self._kick.set()

    def behind(self, now: float) -> bool:
        """Whether a tick at or before ``now`` is still to be handled."""
        return any(
            wf.schedule is not None and wf.schedule.next_after(self._seen.get(name, now)) <= now
            for name, wf in self._scheduled.items()
        )

    async def run_ended(self, name: str) -> None:
        """A run of ``name`` ended here: start the tick held back for it, if any
        (``buffer_one``), before anything else can happen."""
        held = self._buffered.get(name)
        wf = self._scheduled.get(name)
        if held is None or wf is None or await self._running(name, held):
            return
        del self._buffered[name]
        await self._start(wf, held)

    def next_tick(self) -> float | None:
        """The next tick of any scheduled workflow (None: none scheduled)."""
        now = self._journal.clock()
        ticks = [
            wf.schedule.next_after(self._seen.get(name, now))
            for name, wf in self._scheduled.items()
            if wf.schedule is not None
        ]
        return min(ticks) if ticks else None

    async def run(self) -> None:
        while True:
            self._kick.clear()
            now = self._journal.clock()
            for name, wf in self._scheduled.items():
                await self._handle(name, wf, now)
            nxt = self.next_tick()
            wait = (
                _MAX_SLEEP if nxt is None else min(max(nxt - self._journal.clock(), 0), _MAX_SLEEP)
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._kick.wait()
            reraise_if_cancelling()

    async def _handle(self, name: str, wf: Workflow[Any], now: float) -> None:
        schedule = wf.schedule
        assert schedule is not None
        ticks = schedule.ticks(self._seen[name], now)
        held = self._buffered.pop(name, None)
        if held is not None:
            ticks.insert(0, held)
        for tick in ticks:
            if schedule.overlap != "allow" and await self._running(name, tick):
                if schedule.overlap == "buffer_one":
                    self._buffered[name] = max(tick, self._buffered.get(name, tick))
                continue
            await self._start(wf, tick)
        self._seen[name] = now

    async def _running(self, name: str, tick: float) -> bool:
        """Whether a run of an earlier tick of ``name`` is still going."""
        runs = await self._journal.list_runs(RunQuery(workflow=name, statuses=_WAITING))
        own = tick_run_id(name, tick)
        prefix = tick_prefix(name)
        return any(r.run_id.startswith(prefix) and r.run_id < own for r in runs)

    async def _start(self, wf: Workflow[Any], tick: float) -> None:
        run_id = tick_run_id(wf.name, tick)
        if await self._journal.create(
            run_id=run_id,
            workflow=wf.name,
            kwargs=tick_kwargs(wf, tick),
            queue=SCHEDULED_QUEUE,
            timeout=wf.timeout,
        ):
            log.info("scheduled run %s started", run_id, extra={"run_id": run_id})
