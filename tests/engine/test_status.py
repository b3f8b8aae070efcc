"""Status tells the truth (guarantee 8): a run waiting in place reads SUSPENDED,
RUNNING only while its code runs, on every store.

The waits here are shorter than the default ``hot_wait`` (5 s), so the worker
keeps the live coroutine and no replay happens: the status comes from the
wait's own record (and the record that ends it), not from an eviction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from substantial import Conductor, Context, Retry, RunStatus, workflow

from .helpers import eventually, worker

gates: dict[str, asyncio.Event] = {}
attempts: list[int] = []
noted: list[Any] = []  # what ensures_then_blocks' handler has taken in


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    gates.clear()
    attempts.clear()
    noted.clear()
    yield
    for gate in gates.values():
        gate.set()  # never leave a workflow blocked


def gate(name: str) -> asyncio.Event:
    return gates.setdefault(name, asyncio.Event())


async def blocked(name: str) -> str:
    """A save's effect that waits for the test to open ``name``."""
    await gate(name).wait()
    return name


def reads(h: Any, status: RunStatus) -> Any:
    async def check() -> bool:
        return bool(await h.status() == status)

    return check


@workflow()
async def sleeps_two_seconds(c: Context) -> str:
    await c.sleep(2)
    return "woke"


async def test_a_run_sleeping_in_place_reads_suspended_status(conductor: Conductor) -> None:
    conductor.register(sleeps_two_seconds)
    async with worker(conductor):  # the default hot_wait: the sleep stays in place
        h = await conductor.start(sleeps_two_seconds)
        await eventually(reads(h, RunStatus.SUSPENDED), timeout=1.5)
        assert await h.result(timeout=10) == "woke"
    assert await h.status() == RunStatus.COMPLETED


@workflow()
async def sleeps_then_blocks(c: Context) -> str:
    await c.sleep(0.2)
    return await c.save(lambda: blocked("after-sleep"))


async def test_a_save_running_after_an_in_place_sleep_reads_running_status(
    conductor: Conductor,
) -> None:
    conductor.register(sleeps_then_blocks)
    async with worker(conductor):
        h = await conductor.start(sleeps_then_blocks)
        await eventually(reads(h, RunStatus.SUSPENDED))
        await eventually(lambda: "after-sleep" in gates)  # the effect has started
        assert await h.status() == RunStatus.RUNNING  # written before the effect ran
        gate("after-sleep").set()
        assert await h.result(timeout=10) == "after-sleep"


@workflow()
async def receives_then_blocks(c: Context) -> str:
    got = await c.receive("go")
    return f"{got} {await c.save(lambda: blocked('after-receive'))}"


async def test_a_run_waiting_in_receive_reads_suspended_status_until_the_event(
    conductor: Conductor,
) -> None:
    conductor.register(receives_then_blocks)
    async with worker(conductor):
        h = await conductor.start(receives_then_blocks)
        await eventually(reads(h, RunStatus.SUSPENDED))
        await h.send("go", "got")
        await eventually(lambda: "after-receive" in gates)
        assert await h.status() == RunStatus.RUNNING  # the receive's record said so
        gate("after-receive").set()
        assert await h.result(timeout=10) == "got after-receive"
    assert await h.status() == RunStatus.COMPLETED


@workflow()
async def ensures_then_blocks(c: Context) -> str:
    seen: list[Any] = []

    def note(value: Any) -> None:
        seen.append(value)
        noted.append(value)  # (the test's view: a replay would add them again)

    c.handle("note", note)
    await c.ensure(lambda: len(seen) >= 2)
    return await c.save(lambda: blocked("after-ensure"))


async def test_a_run_waiting_in_ensure_reads_suspended_status(conductor: Conductor) -> None:
    conductor.register(ensures_then_blocks)
    async with worker(conductor):
        h = await conductor.start(ensures_then_blocks)
        await eventually(reads(h, RunStatus.SUSPENDED))
        await h.send("note", 1)  # not enough yet: it goes on waiting
        await eventually(lambda: noted == [1])  # taken in (its record rides a later write)
        assert await h.status() == RunStatus.SUSPENDED
        await h.send("note", 2)
        await eventually(lambda: "after-ensure" in gates)
        assert await h.status() == RunStatus.RUNNING
        gate("after-ensure").set()
        assert await h.result(timeout=10) == "after-ensure"


@workflow()
async def waits_for_go(c: Context) -> str:
    return str(await c.receive("go"))


@workflow()
async def waits_for_child(c: Context) -> str:
    child = await c.start_child(waits_for_go)
    got = await child.result()
    return f"{got} {await c.save(lambda: blocked('after-child'))}"


async def test_a_parent_waiting_for_its_child_reads_suspended_status(
    conductor: Conductor,
) -> None:
    conductor.register(waits_for_child, waits_for_go)
    async with worker(conductor):
        h = await conductor.start(waits_for_child)
        await eventually(reads(h, RunStatus.SUSPENDED))
        child = conductor.handle(f"{h.run_id}.0")
        await eventually(reads(child, RunStatus.SUSPENDED))
        await child.send("go", "child done")
        await eventually(lambda: "after-child" in gates)
        assert await h.status() == RunStatus.RUNNING
        gate("after-child").set()
        assert await h.result(timeout=10) == "child done after-child"


async def fails_once() -> str:
    attempts.append(len(attempts) + 1)
    if len(attempts) == 1:
        raise ConnectionError("first attempt fails")
    return await blocked("second attempt")


@workflow()
async def retries_after_a_backoff(c: Context) -> str:
    policy = Retry(max_attempts=2, backoff=timedelta(seconds=2.5))  # under hot_wait: in place
    return await c.save(fails_once, retry=policy)


async def test_a_run_in_a_retry_backoff_reads_suspended_status(conductor: Conductor) -> None:
    conductor.register(retries_after_a_backoff)
    async with worker(conductor):
        h = await conductor.start(retries_after_a_backoff)
        await eventually(lambda: attempts == [1])
        await eventually(reads(h, RunStatus.SUSPENDED))  # the failed attempt's record said so
        assert attempts == [1]  # still in the backoff
        await eventually(lambda: attempts == [1, 2])
        assert await h.status() == RunStatus.RUNNING  # the second attempt runs
        gate("second attempt").set()
        assert await h.result(timeout=10) == "second attempt"


@workflow()
async def saves_twice(c: Context) -> int:
    a = await c.save(lambda: 1)
    b = await c.save(lambda: 2)
    return a + b


async def test_saves_that_follow_no_wait_cost_one_append_each(
    conductor: Conductor, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates: list[Any] = []
    backend: Any = conductor.backend
    append = backend.append

    async def counting(run_id: str, **kw: Any) -> int:
        updates.append(kw.get("update"))
        return int(await append(run_id, **kw))

    monkeypatch.setattr(backend, "append", counting)
    conductor.register(saves_twice)
    async with worker(conductor):
        h = await conductor.start(saves_twice)
        assert await h.result(timeout=10) == 3
    assert updates[:2] == [None, None]  # two saves: two plain appends, no status
    assert len(updates) == 3  # and the end


@workflow()
async def sleeps_four_seconds(c: Context) -> str:
    await c.sleep(4)
    return "woke"


async def test_a_wait_a_replay_continues_in_place_reads_suspended_status(
    conductor: Conductor,
) -> None:
    conductor.register(sleeps_four_seconds)
    async with worker(conductor):
        h = await conductor.start(sleeps_four_seconds)
        await eventually(reads(h, RunStatus.SUSPENDED))
    assert await h.status() == RunStatus.PENDING  # handed back at shutdown
    async with worker(conductor):  # claims it (RUNNING), replays, sleeps on in place
        await eventually(reads(h, RunStatus.SUSPENDED), timeout=3)
        assert await h.result(timeout=10) == "woke"
