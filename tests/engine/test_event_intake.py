"""Taking an event in costs no round trip of its own: the event moves from the
inbox into the log with the record of the call that consumes it, and that
record goes with the run's next write."""

from __future__ import annotations

import orjson

from substantial import Conductor, Context, RunStatus, workflow
from substantial.backends.memory import MemoryBackend

from .helpers import eventually, worker


@workflow()
async def echo_once(c: Context) -> str:
    got: str = await c.receive("ping")
    return got.upper()


async def test_an_event_the_receive_that_consumes_it_and_the_end_are_one_write() -> None:
    backend = MemoryBackend()
    c = Conductor(backend)
    c.register(echo_once)
    async with worker(c):
        h = await c.start(echo_once)

        async def waiting() -> bool:  # armed: the receive waits in place
            return await h.status() == RunStatus.SUSPENDED

        await eventually(waiting)
        appends = backend.calls.get("append", 0)
        await h.send("ping", "hi")
        assert await h.result(timeout=10) == "HI"
    assert backend.calls["append"] - appends == 1  # [event, receive, end]
    snap = await backend.read(h.run_id)
    assert snap is not None
    kinds = [orjson.loads(r)["k"] for r in snap.log]
    assert kinds == ["start", "arm", "event", "call", "end"]
    assert snap.run.inbox_pos == 1  # the inbox position moved with the event
    await c.close()
