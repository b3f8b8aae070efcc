"""Starting, cancelling, composing and finding runs."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from substantial import (
    Conductor,
    Context,
    FilterError,
    RunCancelled,
    RunFailed,
    RunHandle,
    RunReverted,
    RunStatus,
    workflow,
)
from substantial.backends.memory import MemoryBackend

from .helpers import eventually, worker

effects: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    effects.clear()


@workflow()
async def echo(c: Context, x: object = None) -> object:
    return await c.save(lambda: x)


async def test_start_is_idempotent_on_run_id(conductor: Conductor) -> None:
    conductor.register(echo)
    handles = await asyncio.gather(
        *(conductor.start(echo, {"x": i}, run_id="same") for i in range(5))
    )
    assert {h.run_id for h in handles} == {"same"}
    async with worker(conductor):
        result = await conductor.handle("same").result(timeout=10)
    assert result in range(5)
    assert len(await conductor.search("echo")) == 1


@workflow()
async def forever(c: Context) -> None:
    await c.receive("never")


@workflow()
async def waits_armed(c: Context) -> None:
    await c.receive("never", timeout=3600)  # the timeout's arm record marks the wait


async def _log(conductor: Conductor, run_id: str) -> list[dict[str, Any]]:
    snap = await conductor.backend.read(run_id)
    assert snap is not None
    return [orjson.loads(data) for data in snap.log]


async def _armed(conductor: Conductor, run_id: str) -> bool:
    return any(r["k"] == "arm" and r["p"] == "receive" for r in await _log(conductor, run_id))


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_cancel_stops_a_waiting_run(conductor: Conductor, hot_wait: float) -> None:
    conductor.register(waits_armed)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(waits_armed)
        await eventually(lambda: _armed(conductor, h.run_id))  # the run is in its wait
        await h.cancel()
        with pytest.raises(RunCancelled):
            await h.result(timeout=10)
    assert await h.status() == RunStatus.CANCELLED
    kinds = [(r["k"], r.get("p"), r.get("status")) for r in await _log(conductor, h.run_id)]
    # it ended inside the wait: no event was received, the arm is the last call
    assert kinds[-2:] == [("arm", "receive", None), ("end", None, "CANCELLED")]


@workflow()
async def child(c: Context, n: int) -> int:
    await c.sleep(0.05)
    doubled: int = await c.save(lambda: n * 2)
    return doubled


@workflow()
async def parent(c: Context, ns: list[int]) -> list[int]:
    handles = [await c.start_child(child, {"n": n}) for n in ns]
    return [await h.result() for h in handles]


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_child_workflows_return_results_to_the_parent(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(parent, child)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(parent, {"ns": [1, 2, 3]})
        assert await h.result(timeout=20) == [2, 4, 6]
    children = await conductor.search("child")
    assert len(children) == 3 and all(s.status == RunStatus.COMPLETED for s in children)


@workflow()
async def bad_child(c: Context) -> None:
    raise RuntimeError("child broke")


@workflow()
async def parent_of_bad(c: Context) -> str:
    h = await c.start_child(bad_child)
    try:
        await h.result()
    except RunFailed as exc:
        return f"caught: {exc}"
    return "no error"


async def test_a_failed_child_raises_run_failed_in_the_parent(conductor: Conductor) -> None:
    conductor.register(parent_of_bad, bad_child)
    async with worker(conductor):
        h = await conductor.start(parent_of_bad)
        assert await h.result(timeout=10) == "caught: child broke"


@workflow()
async def parent_waiting(c: Context) -> None:
    h = await c.start_child(forever)
    await h.result()


async def test_cancelling_a_parent_cancels_its_descendants(conductor: Conductor) -> None:
    conductor.register(parent_waiting, forever)
    async with worker(conductor, hot_wait=0):
        h = await conductor.start(parent_waiting)
        await eventually(lambda: _count(conductor, "forever", RunStatus.SUSPENDED, 1))
        await h.cancel()
        with pytest.raises(RunCancelled):
            await h.result(timeout=10)
        [kid] = await conductor.search("forever")
        with pytest.raises(RunCancelled):
            await conductor.handle(kid.run_id).result(timeout=10)


async def _released(backend: MemoryBackend, run_id: str) -> bool:
    run = await backend.get_run(run_id)
    return run is not None and run.status == RunStatus.SUSPENDED and run.lease_owner is None


async def _count(c: Conductor, wf: str, status: RunStatus, n: int) -> bool:
    return len([s for s in await c.search(wf) if s.status == status]) == n


@workflow()
async def booking(c: Context, fail: bool) -> str:
    await c.save(
        lambda: effects.append("book hotel"), compensate_with=lambda: effects.append("cancel hotel")
    )
    await c.save(
        lambda: effects.append("book flight"),
        compensate_with=lambda: effects.append("cancel flight"),
    )
    await c.sleep(0.01)
    if fail:
        await c.revert()
    return "booked"


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_revert_runs_compensations_in_reverse_once(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(booking)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(booking, {"fail": True})
        with pytest.raises(RunReverted):
            await h.result(timeout=10)
    assert effects == ["book hotel", "book flight", "cancel flight", "cancel hotel"]
    assert await h.status() == RunStatus.REVERTED


@workflow()
async def counter(c: Context, n: int, upto: int) -> int:
    await c.save(lambda: effects.append(f"count {n}"))
    if n < upto:
        await c.continue_using(counter, {"n": n + 1, "upto": upto})
    return n


async def test_continue_using_starts_a_fresh_run_and_the_handle_follows(
    conductor: Conductor,
) -> None:
    conductor.register(counter)
    async with worker(conductor):
        h = await conductor.start(counter, {"n": 0, "upto": 3})
        assert await h.result(timeout=10) == 3
    assert await h.status() == RunStatus.COMPLETED  # the handle reports the last run
    first = await conductor.backend.get_run(h.run_id)
    assert first is not None and first.status == RunStatus.CONTINUED
    runs = await conductor.search("counter")
    assert sorted(s.status for s in runs).count(RunStatus.CONTINUED) == 3
    assert effects == ["count 0", "count 1", "count 2", "count 3"]


@workflow()
async def relay(c: Context, round: int) -> Any:
    await c.log.info("round", n=round)
    got = await c.receive("next")
    if got == "again":
        await c.continue_using(relay, {"round": round + 1})
    if got == "wait":
        await c.sleep(60)
    return {"round": round, "got": got}


async def test_send_cancel_and_logs_follow_continue_using(conductor: Conductor) -> None:
    conductor.register(relay)

    async def continued(h: RunHandle[Any]) -> bool:  # the chain has moved past the first run
        return (await h.summary()).run_id != h.run_id

    async with worker(conductor):
        h = await conductor.start(relay, {"round": 0})
        await h.send("next", "again")  # round 0 continues into round 1
        await eventually(lambda: continued(h))
        await h.send("next", "done")  # reaches round 1 through the first run's handle
        assert await h.result(timeout=10) == {"round": 1, "got": "done"}
        assert [(r.message, r.fields) for r in await h.logs()] == [
            ("round", {"n": 0}),
            ("round", {"n": 1}),
        ]

        h2 = await conductor.start(relay, {"round": 0})
        await h2.send("next", "again")
        await eventually(lambda: continued(h2))
        await h2.send("next", "wait")
        await h2.cancel()  # cancels round 1, not the ended round 0
        with pytest.raises(RunCancelled):
            await h2.result(timeout=10)
        assert await h2.status() == RunStatus.CANCELLED


gates: dict[str, asyncio.Event] = {}


async def _hold() -> str:
    """A step that stays in flight until the test opens the gate."""
    gates["reached"].set()
    await gates["open"].wait()
    return "held"


@workflow()
async def gated_relay(c: Context, round: int) -> Any:
    got = await c.receive("next")
    if got == "again":
        # round 0 is still running here, past its last receive
        await c.save(_hold)
        await c.continue_using(gated_relay, {"round": round + 1})
    return {"round": round, "got": got}


async def test_an_event_sent_while_a_run_continues_reaches_its_successor(
    conductor: Conductor,
) -> None:
    """The event lands in round 0's inbox after its last receive, before it continues:
    only the hand-over at continue_using can bring it to round 1."""
    gates.update(reached=asyncio.Event(), open=asyncio.Event())
    conductor.register(gated_relay)
    async with worker(conductor):
        h = await conductor.start(gated_relay, {"round": 0})
        await h.send("next", "again")
        await asyncio.wait_for(gates["reached"].wait(), 10)
        await h.send("next", "done")  # round 0 is not finished: its inbox takes it
        snap = await conductor.backend.read(h.run_id)
        assert snap is not None and not snap.run.status.is_terminal
        assert [orjson.loads(i.data) for i in snap.inbox] == [{"name": "next", "v": "done"}]
        gates["open"].set()
        assert await h.result(timeout=10) == {"round": 1, "got": "done"}
    first = await conductor.backend.get_run(h.run_id)
    assert first is not None and first.status == RunStatus.CONTINUED
    assert isinstance(first.result, dict)
    successor = await conductor.backend.read(first.result["continued_to"])
    assert successor is not None and successor.run.inbox_pos == 1  # forwarded: its only item


async def test_search_filters_runs_with_the_metatype_grammar(conductor: Conductor) -> None:
    conductor.register(echo, bad_child)
    async with worker(conductor):
        hs = [await conductor.start(echo, {"x": x}) for x in (1, 5, "hello", [1, 2])]
        for h in hs:
            await h.result(timeout=10)
        bad = await conductor.start(bad_child)
        with pytest.raises(RunFailed):
            await bad.result(timeout=10)
    assert {s.result for s in await conductor.search("echo", {"gt": 2})} == {5}
    found = await conductor.search("echo", {"or": [{"eq": 1}, {"contains": "ell"}]})
    assert sorted(str(s.result) for s in found) == ["1", "hello"]
    assert len(await conductor.search("echo", {"contains": 2})) == 1
    assert len(await conductor.search("echo", {"status": {"eq": "COMPLETED"}})) == 4
    [failed] = await conductor.search("bad_child", {"contains": "broke"})
    assert failed.status == RunStatus.FAILED and failed.error == "child broke"
    assert failed.started_at is not None and failed.ended_at is not None
    assert await conductor.search("echo", {"not": {"started_at": {"eq": None}}})
    with pytest.raises(FilterError, match=r"or\[0\]"):
        await conductor.search("echo", {"or": [{"bogus": 1}]})


@workflow()
async def long_sleeper(c: Context) -> str:
    await c.sleep(60)
    return "woke"


@workflow()
async def waiter(c: Context) -> object:
    return await c.receive("ping")


async def test_a_sleeping_run_costs_no_store_calls_and_an_event_wakes_at_once() -> None:
    backend = MemoryBackend()  # no cross-process writers: the worker never needs to poll
    async with Conductor(backend) as conductor:
        await _idle_runs_cost_nothing(conductor, backend)


async def _idle_runs_cost_nothing(conductor: Conductor, backend: MemoryBackend) -> None:
    conductor.register(long_sleeper, waiter)
    async with worker(conductor, hot_wait=0.5):
        h = await conductor.start(long_sleeper)
        w = await conductor.start(waiter)
        # evicted (a waiting run reads SUSPENDED in place too): its lease is given back
        await eventually(lambda: _released(backend, h.run_id))
        await eventually(lambda: _released(backend, w.run_id))
        before = dict(backend.calls)
        await asyncio.sleep(3)  # an observation window: both runs idle, nothing may
        assert backend.calls == before  # touch the store (no poll, no renewal)
        # The memory store has no polling period at all, so only the send's hint can
        # wake the worker: the run completing proves the hint arrived and was acted on.
        assert backend.poll_interval is None
        await w.send("ping", "pong")
        assert await w.result(timeout=5) == "pong"
        assert await h.status() == RunStatus.SUSPENDED
        assert backend.calls["claim_due"] > before["claim_due"]  # the hint's claim
