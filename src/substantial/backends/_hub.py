"""In-process change hints, shared by the stores without a server-side channel."""

from __future__ import annotations

import asyncio
import threading
import weakref
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
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, q in list(self._subs):
            if running is loop:
                q.put_nowait(run_id)
                continue
            try:
                loop.call_soon_threadsafe(q.put_nowait, run_id)
            except RuntimeError:  # that loop closed while its subscriber was registered
                continue

    async def subscribe(self) -> AsyncIterator[str]:
        """The queue is registered before the first item, ``""``, is yielded: a
        publish from then on reaches it (the protocol's readiness rule)."""
        entry = (asyncio.get_running_loop(), asyncio.Queue[str]())
        self._subs.append(entry)
        try:
            yield ""
            while True:
                yield await entry[1].get()
        finally:
            self._subs.remove(entry)


# Weak: a hub lives while a backend object holds it (no growth with every tmp store).
_shared: weakref.WeakValueDictionary[str, LocalHub] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def shared_hub(key: str) -> LocalHub:
    """The one hub of this process for the store at ``key`` (a resolved path), so
    two backend objects on one file or directory see each other's hints."""
    with _shared_lock:
        hub = _shared.get(key)
        if hub is None:
            hub = LocalHub()
            _shared[key] = hub
        return hub
