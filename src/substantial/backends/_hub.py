"""In-process change hints, shared by the stores without a server-side channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class LocalHub:
    """Fan-out of run-id hints to every subscriber in this process.

    Each ``subscribe()`` gets its own unbounded queue; ``publish`` never blocks.
    Subscribers may live on different event loops (a client and a worker in
    separate threads), so publishing goes through ``call_soon_threadsafe``.
    """

    def __init__(self) -> None:
        self._subs: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[str]]] = []

    def publish(self, run_id: str) -> None:
        for loop, q in list(self._subs):
            if loop.is_closed():
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                q.put_nowait(run_id)
            else:
                loop.call_soon_threadsafe(q.put_nowait, run_id)

    async def subscribe(self) -> AsyncIterator[str]:
        entry = (asyncio.get_running_loop(), asyncio.Queue[str]())
        self._subs.append(entry)
        try:
            yield ""  # registered: every publish from now on reaches this subscriber
            while True:
                yield await entry[1].get()
        finally:
            self._subs.remove(entry)
