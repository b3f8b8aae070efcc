"""Each durable primitive, live and on replay, on every store."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import orjson
import pydantic
import pytest

from substantial import Conductor, Context, RunFailed, RunStatus, workflow

from .helpers import eventually, worker

calls: dict[str, int] = {}


def bump(key: str) -> int:
    calls[key] = calls.get(key, 0) + 1
    return calls[key]


def _bump_then(key: str, value: int) -> int:
    bump(key)
    return value


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()


@workflow()
async def steps(c: Context, n: int = 3) -> list[int]:
    out = []
    for i in range(n):
        out.append(await c.save(partial(_bump_then, f"step{i}", i * 10)))
        await c.sleep(0.01)
    return out


async def test_save_runs_each_step_once_and_returns_values(conductor: Conductor) -> None:
    conductor.register(steps)
    async with worker(conductor, hot_wait=0):  # every sleep suspends: later steps replay
        h = await conductor.start(steps, {"n": 4})
        assert await h.result(timeout=20) == [0, 10, 20, 30]
    assert calls == {"step0": 1, "step1": 1, "step2": 1, "step3": 1}
    assert await h.status() == RunStatus.COMPLETED


@workflow()
async def async_and_sync(c: Context) -> list[object]:
    async def fetch() -> str:
        await asyncio.sleep(0)
        return "async"

    a = await c.save(fetch)
    b = await c.save(lambda: "sync")
    d = await c.save(lambda: fetch())  # a lambda returning a coroutine
    return [a, b, d]


async def test_save_accepts_sync_and_async_callables(conductor: Conductor) -> None:
    conductor.register(async_and_sync)
    async with worker(conductor):
        h = await conductor.start(async_and_sync)
        assert await h.result(timeout=10) == ["async", "sync", "async"]


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Invoice(pydantic.BaseModel):
    id: uuid.UUID
    due: datetime
    lines: list[Point]


@workflow()
async def typed(c: Context) -> dict[str, object]:
    inv = await c.save(
        lambda: Invoice(
            id=uuid.UUID(int=7), due=datetime(2030, 1, 2, tzinfo=UTC), lines=[Point(1, 2)]
        ),
        type=Invoice,
    )
    when = await c.save(lambda: datetime(2031, 5, 6, tzinfo=UTC), type=datetime)
    p = await c.save(lambda: Point(3, 4), type=Point)
    await c.sleep(0.01)  # replay after this point in hot_wait=0 mode
    assert isinstance(inv, Invoice) and isinstance(inv.lines[0], Point)
    assert isinstance(when, datetime) and isinstance(p, Point)
    return {"id": str(inv.id), "year": when.year, "p": [p.x, p.y]}


async def test_save_type_coerces_stored_json_back(conductor: Conductor) -> None:
    conductor.register(typed)
    async with worker(conductor, hot_wait=0):
        h = await conductor.start(typed)
        assert await h.result(timeout=10) == {
            "id": str(uuid.UUID(int=7)),
            "year": 2031,
            "p": [3, 4],
        }


@workflow()
async def recorded_values(c: Context) -> list[object]:
    t = await c.now()
    r = await c.random()
    u = await c.uuid4()
    assert t.tzinfo is not None and 0 <= r < 1 and isinstance(u, uuid.UUID)
    await c.sleep(0.01)
    again = await c.save(lambda: [t.isoformat(), r, str(u)])
    return [t.isoformat(), r, str(u), again]


async def test_now_random_uuid_are_identical_on_replay(conductor: Conductor) -> None:
    conductor.register(recorded_values)
    async with worker(conductor, hot_wait=0):
        h = await conductor.start(recorded_values)
        t, r, u, again = await h.result(timeout=10)
    assert again == [t, r, u]
    assert abs(datetime.fromisoformat(str(t)) - datetime.now(UTC)) < timedelta(seconds=30)


@workflow()
async def sleeper(c: Context, seconds: float) -> float:
    start = await c.now()
    await c.sleep(timedelta(seconds=seconds))
    end = await c.now()
    return (end - start).total_seconds()


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_sleep_waits_at_least_its_duration(conductor: Conductor, hot_wait: float) -> None:
    conductor.register(sleeper)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(sleeper, {"seconds": 0.3})
        assert await h.result(timeout=10) >= 0.3


@workflow()
async def sleep_until_wf(c: Context, when: str) -> str:
    await c.sleep_until(datetime.fromisoformat(when))
    return (await c.now()).isoformat()


async def test_sleep_until_wakes_after_the_instant(conductor: Conductor) -> None:
    conductor.register(sleep_until_wf)
    when = datetime.now(UTC) + timedelta(seconds=0.3)
    async with worker(conductor, hot_wait=0):
        h = await conductor.start(sleep_until_wf, {"when": when.isoformat()})
        assert datetime.fromisoformat(await h.result(timeout=10)) >= when


@workflow()
async def receiver(c: Context, names: list[str]) -> list[object]:
    return [await c.receive(n) for n in names]


async def test_two_events_sent_back_to_back_are_received_in_send_order(
    conductor: Conductor,
) -> None:
    conductor.register(receiver)
    async with worker(conductor):
        h = await conductor.start(receiver, {"names": ["x", "x", "x"]})
        await asyncio.gather(h.send("x", 1))
        await h.send("x", 2)
        await h.send("x", 3)
        assert await h.result(timeout=10) == [1, 2, 3]


async def test_events_sent_before_the_worker_starts_are_kept(conductor: Conductor) -> None:
    conductor.register(receiver)
    h = await conductor.start(receiver, {"names": ["b", "a"]})
    await h.send("a", "first-a")
    await h.send("b", "first-b")
    async with worker(conductor):
        assert await h.result(timeout=10) == ["first-b", "first-a"]


@workflow()
async def sleep_then_receive(c: Context) -> list[object]:
    seen: list[object] = []
    c.handle("go", seen.append)
    await c.sleep(0.5)
    right_after = list(seen)  # an event that came during the sleep is not seen yet
    got = await c.receive("go")
    return [right_after, got, list(seen)]


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_event_sent_during_a_sleep_is_received_after_it(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(sleep_then_receive)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(sleep_then_receive)
        await eventually(lambda: _status_is(h, RunStatus.SUSPENDED))  # in the sleep
        await h.send("go", "during-sleep")
        assert await h.result(timeout=10) == [[], "during-sleep", ["during-sleep"]]
    snap = await conductor.backend.read(h.run_id)
    assert snap is not None
    kinds = [orjson.loads(data)["k"] for data in snap.log]
    assert kinds[1:3] == ["arm", "event"]  # it arrived during the sleep, after its arm


async def _status_is(h: Any, status: RunStatus) -> bool:
    return bool(await h.status() == status)


@workflow()
async def timed_receive(c: Context) -> str:
    try:
        await c.receive("never", timeout=0.2)
    except TimeoutError:
        return "timed out"
    return "got it"


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_receive_timeout_raises_timeout_error(conductor: Conductor, hot_wait: float) -> None:
    conductor.register(timed_receive)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(timed_receive)
        assert await h.result(timeout=10) == "timed out"


@workflow()
async def handler_wf(c: Context) -> list[object]:
    seen: list[object] = []
    c.handle("note", seen.append)
    await c.receive("stop")
    return seen


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_handle_sees_every_event_in_order(conductor: Conductor, hot_wait: float) -> None:
    conductor.register(handler_wf)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(handler_wf)
        for i in range(5):
            await h.send("note", i)
        await asyncio.sleep(0.05)
        await h.send("stop")
        assert await h.result(timeout=10) == [0, 1, 2, 3, 4]


@workflow()
async def ensure_wf(c: Context) -> int:
    count = {"n": 0}
    c.handle("inc", lambda v: count.__setitem__("n", count["n"] + v))
    await c.ensure(lambda: count["n"] >= 3)
    return count["n"]


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_ensure_suspends_until_the_predicate_holds(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(ensure_wf)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(ensure_wf)
        await h.send("inc", 1)
        await asyncio.sleep(0.05)
        assert await h.status() != RunStatus.COMPLETED
        await h.send("inc", 2)
        assert await h.result(timeout=10) == 3


@workflow()
async def ensure_timeout_wf(c: Context) -> str:
    try:
        await c.ensure(lambda: False, timeout=0.2, poll=0.05)
    except TimeoutError:
        return "timeout"
    return "held"


async def test_ensure_timeout_raises_timeout_error(conductor: Conductor) -> None:
    conductor.register(ensure_timeout_wf)
    async with worker(conductor):
        h = await conductor.start(ensure_timeout_wf)
        assert await h.result(timeout=10) == "timeout"


@workflow()
async def kwargs_wf(c: Context, a: int, b: str = "x") -> list[object]:
    return [a, b, c.kwargs]


async def test_kwargs_are_keyword_arguments_and_on_context(conductor: Conductor) -> None:
    conductor.register(kwargs_wf)
    async with worker(conductor):
        h = await conductor.start(kwargs_wf, {"a": 1})
        assert await h.result(timeout=10) == [1, "x", {"a": 1}]


@workflow()
async def failing(c: Context) -> None:
    await c.save(lambda: 1)
    raise ValueError("the answer is wrong")


async def test_a_workflow_exception_fails_the_run_with_its_message(conductor: Conductor) -> None:
    conductor.register(failing)
    async with worker(conductor):
        h = await conductor.start(failing)
        with pytest.raises(RunFailed) as err:
            await h.result(timeout=10)
    assert "the answer is wrong" in str(err.value)
    assert await h.status() == RunStatus.FAILED
