"""One subscription to the store's change hints per Conductor, fanned out.

The ordering rule that makes wake-ups impossible to lose (guarantee 7): a
party that waits on hints (a worker before its first claim, ``result()``
before its first read) first awaits :meth:`HintRelay.ready`, which returns
once the store has confirmed the subscription (its first hint, ``""``). A
change made after that point is hinted; a change made before it is seen by
the look that follows. So whatever order tasks, processes and subscriptions
start in, no change falls between a look and a subscription.

The listener is supervised: if it fails it is restarted, and the store's
``""`` on re-subscribing tells every party to look again (hints may have been
lost meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ._journal import Journal
from ._supervision import supervise

HintTarget = Callable[[str], None]


class HintRelay:
    """Relays run-id hints ("" = look at everything) to registered targets."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._targets: list[HintTarget] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                supervise("hint listener", self._listen), name="substantial-hints"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ready.clear()

    async def ready(self) -> None:
        """Return once the store confirmed the subscription: hints now arrive."""
        await self._ready.wait()

    def add(self, target: HintTarget, *, first: bool = False) -> None:
        """Relay hints to ``target`` too; ``first``: before the targets added so far."""
        if first:
            self._targets.insert(0, target)
        else:
            self._targets.append(target)

    def remove(self, target: HintTarget) -> None:
        with contextlib.suppress(ValueError):
            self._targets.remove(target)

    def nudge(self) -> None:
        """Tell every party to look again, as the store's ``""`` does: something
        no store hints has changed (a test environment's clock moved)."""
        for target in list(self._targets):
            target("")

    async def _listen(self) -> None:
        async for run_id in self._journal.hints():
            self._ready.set()
            for target in list(self._targets):
                target(run_id)
