"""A child's outcome reaches its parent's log once, however many times it is sent.

Two processes may send it: the child's worker when the child ends, and the
parent itself when it asks for the result of a child that ended and finds no
outcome in its log (the notice of a child whose worker died between its end and
its notice). The parent's view of its log can lag its inbox, so both may send
it; the parent takes the first in and drops the others.
"""

from __future__ import annotations

import asyncio
from typing import Any

from substantial import Conductor, Context, RunStatus, workflow
from substantial._composition import child_event
from substantial.backends.memory import MemoryBackend

from .helpers import eventually, worker


@workflow()
async def kid(c: Context) -> str:
    return "kid done"


# The run the parent's ``save`` waits for: set by each test (one conductor at a time).
_watch: dict[str, Any] = {}


async def _child_has_ended_and_notified() -> None:
    """Return once the child ended and its notice waits in the parent's inbox, so
    that the parent asks for the result with its log behind its inbox."""
    conductor: Conductor = _watch["conductor"]
    parent_id, child_id = _watch["parent"], f"{_watch['parent']}.0"
    backend = conductor.journal.backend
    await eventually(lambda: _ended(conductor, child_id), timeout=20)
    await eventually(lambda: _inbox_holds(backend, parent_id, child_id), timeout=20)


async def _ended(conductor: Conductor, run_id: str) -> bool:
    return (await conductor.handle(run_id).status()).is_terminal


async def _inbox_holds(backend: Any, run_id: str, child_id: str) -> bool:
    snap = await backend.read(run_id, log_from=-1)
    return any(child_event(child_id).encode() in item.data for item in snap.inbox)


@workflow()
async def busy_parent(c: Context) -> Any:
    h = await c.start_child(kid)
    await c.save(_child_has_ended_and_notified)  # busy while the child ends
    return await h.result()


async def outcomes_in_log(conductor: Conductor, parent_id: str) -> int:
    name = child_event(f"{parent_id}.0")
    history = await conductor.history(parent_id)
    return sum(1 for e in history.entries if e.kind == "event" and e.name == name)


async def test_a_notice_sent_again_while_the_first_waits_in_the_inbox_is_logged_once(
    conductor: Conductor,
) -> None:
    """The child ended and notified while the parent was busy in a step: the
    parent's log does not have the notice yet (its inbox does), so the parent sends
    it again when it asks for the result."""
    conductor.register(busy_parent, kid)
    _watch.update(conductor=conductor, parent="busy")
    async with worker(conductor, concurrency=4):
        h = await conductor.start(busy_parent, run_id="busy")
        assert await h.result(timeout=30) == "kid done"
    assert await outcomes_in_log(conductor, "busy") == 1


class NoticeInFlight(MemoryBackend):
    """The child's worker's notice is held in flight until the parent has sent its
    own (the parent found the child ended and no notice anywhere), and lands before
    the parent reads its inbox again: both are there when it does."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self._parents_landed = asyncio.Event()
        self._childs_landed = asyncio.Event()

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        if b"substantial.child:" not in data:
            return await super().deliver(run_id, data, now=now)
        self.sent += 1
        async with asyncio.timeout(20):
            if self.sent == 1:  # the child's worker, as the child ended
                await self._parents_landed.wait()
                got = await super().deliver(run_id, data, now=now)
                self._childs_landed.set()
            else:  # the parent's own, as it asks for the result
                got = await super().deliver(run_id, data, now=now)
                self._parents_landed.set()
                await self._childs_landed.wait()
        return got


@workflow()
async def waiting_parent(c: Context) -> Any:
    h = await c.start_child(kid)
    await c.save(_child_has_ended)
    return await h.result()


async def _child_has_ended() -> None:
    conductor: Conductor = _watch["conductor"]
    await eventually(lambda: _ended(conductor, f"{_watch['parent']}.0"), timeout=20)


async def test_a_notice_sent_by_both_the_child_and_the_parent_is_logged_once() -> None:
    backend = NoticeInFlight()
    conductor = Conductor(backend)
    conductor.register(waiting_parent, kid)
    _watch.update(conductor=conductor, parent="both")
    try:
        async with worker(conductor, concurrency=4):
            h = await conductor.start(waiting_parent, run_id="both")
            assert await h.result(timeout=30) == "kid done"
        assert backend.sent == 2  # both notices were sent, and both reached the inbox
        assert await _inbox_empty(backend, "both")  # the parent took both in
        assert await conductor.handle("both.0").status() == RunStatus.COMPLETED
        assert await outcomes_in_log(conductor, "both") == 1
    finally:
        await conductor.close()


async def _inbox_empty(backend: MemoryBackend, run_id: str) -> bool:
    snap = await backend.read(run_id, log_from=-1)
    return snap is not None and not snap.inbox
