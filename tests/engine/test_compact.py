"""compact(): only the last record of each key stays; replays still reach the same state."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from substantial import Conductor, Context, RunFailed, RunStatus, workflow
from substantial._journal import decode_record

from .helpers import eventually, worker

effects: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    effects.clear()


def step(tag: str, value: Any) -> Any:
    effects.append(tag)
    return value


async def log_of(conductor: Conductor, run_id: str) -> list[dict[str, Any]]:
    snap = await conductor.backend.read(run_id)
    assert snap is not None
    return [decode_record(run_id, i, data) for i, data in enumerate(snap.log)]


@workflow()
async def summing(c: Context, n: int) -> int:
    state = await c.save(lambda: step("init", {"i": 0, "total": 0}), key="state")
    while state["i"] < n:
        i = state["i"] + 1
        state = await c.save(
            partial(step, f"add {i}", {"i": i, "total": state["total"] + i}),
            key="state",
        )
        await c.compact()
    return int(state["total"])


async def test_a_looping_workflow_keeps_a_bounded_log(conductor: Conductor) -> None:
    conductor.register(summing)
    async with worker(conductor):
        h = await conductor.start(summing, {"n": 50})
        assert await h.result(timeout=20) == 50 * 51 // 2
    assert effects == ["init", *(f"add {i}" for i in range(1, 51))]
    kinds = [r["k"] for r in await log_of(conductor, h.run_id)]
    assert kinds == ["start", "call", "mark", "end"]  # the start, the last "state", the end


@workflow()
async def counting_then_waiting(c: Context, n: int) -> Any:
    total = 0
    for i in range(n):  # the loop index is not durable: replays recompute it
        total = await c.save(partial(step, f"add {i}", total + i), key="total")
        await c.compact()
    now = await c.now()  # an unkeyed call: its record stays
    got = await c.receive("go")
    return {"total": total, "got": got, "now": now.isoformat()}


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_a_replay_over_a_compacted_log_reaches_the_same_state(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(counting_then_waiting)
    async with worker(conductor, hot_wait=hot_wait):  # evicted: receive() suspends, then replays
        h = await conductor.start(counting_then_waiting, {"n": 10})
        await h.send("go", "yes")
        out = await h.result(timeout=20)
    assert out["total"] == sum(range(10)) and out["got"] == "yes"
    assert effects == [f"add {i}" for i in range(10)]  # no step ran twice
    records = await log_of(conductor, h.run_id)
    assert [r.get("p") for r in records if r["k"] == "call"] == ["save", "now", "receive"]


@workflow()
async def keyed_and_unkeyed(c: Context) -> list[Any]:
    out = []
    for i in range(3):
        out.append(await c.save(partial(step, f"plain {i}", i)))  # no key: stays
        out.append(await c.save(partial(step, f"keyed {i}", i * 10), key="k"))
        await c.compact()
    out.append(await c.receive("go"))
    return out


async def test_records_without_a_key_are_kept(conductor: Conductor) -> None:
    conductor.register(keyed_and_unkeyed)
    h = await conductor.start(keyed_and_unkeyed)
    await h.send("go", "done")  # before the worker: the run never waits, never replays
    async with worker(conductor, hot_wait=0):
        # (a replay would rebuild ``out`` from the kept values: 20 for each "k")
        assert await h.result(timeout=20) == [0, 0, 1, 10, 2, 20, "done"]
    assert effects == [f"{kind} {i}" for i in range(3) for kind in ("plain", "keyed")]
    saves = [r for r in await log_of(conductor, h.run_id) if r.get("p") == "save"]
    assert [r.get("key") for r in saves] == [None, None, None, "k"]


@workflow()
async def renamed_key(c: Context, key: str) -> Any:
    for i in range(3):
        await c.save(partial(int, i), key=key)
        await c.compact()
    return await c.receive("go")


async def test_a_replay_whose_keys_changed_fails_clearly(conductor: Conductor) -> None:
    conductor.register(renamed_key)
    async with worker(conductor, hot_wait=0):  # receive() suspends: the next turn replays
        h = await conductor.start(renamed_key, {"key": "a"})
        await eventually(lambda: _is(h.status(), RunStatus.SUSPENDED))

    async def changed(c: Context, key: str) -> Any:  # the code now uses another key
        return await renamed_key.fn(c, "b")

    redeployed = Conductor(conductor.backend)
    redeployed.register(workflow(name="renamed_key")(changed))
    async with worker(redeployed, hot_wait=0):
        await h.send("go", 2)
        with pytest.raises(RunFailed, match="save\\(key='b'\\)"):
            await redeployed.handle(h.run_id).result(timeout=20)


async def _is(status: Any, want: RunStatus) -> bool:
    return bool(await status == want)


@workflow()
async def poller(c: Context, rounds: int) -> int:
    state = await c.save(lambda: {"round": 0}, key="state")
    while state["round"] < rounds:
        state = await c.save(
            partial(step, f"poll {state['round']}", {"round": state["round"] + 1}), key="state"
        )
        await c.compact()
        await c.sleep(0.01, key="pause")  # evicted: every pause suspends, then replays
    return int(state["round"])


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_a_sleeping_loop_with_keyed_calls_stays_bounded(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(poller)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(poller, {"rounds": 12})
        assert await h.result(timeout=30) == 12
    assert effects == [f"poll {i}" for i in range(12)]
    records = await log_of(conductor, h.run_id)
    # start, the last "state", the last "pause" and the one before it, the mark, the end
    assert len(records) <= 6, records


def month(st: dict[str, int]) -> dict[str, int]:
    effects.append(f"month {st['left']}")
    return {"left": st["left"] - 1}


@workflow()
async def payroll(c: Context, months: int) -> dict[str, Any]:
    """The Metatype guide's pattern: keyed state drives the loop, which compacts
    every round; ordinary unkeyed calls follow it."""
    st = await c.save(lambda: {"left": months}, key="state")
    while st["left"] > 0:
        await c.save(partial(step, f"pay {st['left']}", st["left"]), key="payment")
        await c.sleep(0.01, key="pause")
        st = await c.save(partial(month, st), key="state")
        await c.compact()
    got = await c.receive("go")
    c.log.info("paid", months=months)
    final = await c.save(lambda: step("final", {"got": got}))
    return {"final": final, "left": st["left"]}


async def _waits_in_receive(conductor: Conductor, run_id: str) -> bool:
    return any(r["k"] == "arm" and r["p"] == "receive" for r in await log_of(conductor, run_id))


PAYROLL_EFFECTS = [*(e for m in range(6, 0, -1) for e in (f"pay {m}", f"month {m}")), "final"]


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_unkeyed_calls_after_a_compacted_loop_replay(
    conductor: Conductor, hot_wait: float
) -> None:
    """Evicted, every pause replays the compacted log inside the loop; then a
    restart after the loop replays it all again, up to the receive."""
    conductor.register(payroll)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(payroll, {"months": 6})
        await eventually(lambda: _waits_in_receive(conductor, h.run_id))  # past the loop
    async with worker(conductor, hot_wait=hot_wait):  # a fresh worker replays it all
        await h.send("go", "now")
        assert await h.result(timeout=20) == {"final": {"got": "now"}, "left": 0}
    assert effects == PAYROLL_EFFECTS  # each round's effect once
    records = await log_of(conductor, h.run_id)
    assert [r["k"] for r in records].count("call") <= 6, records  # bounded
    assert [r.get("p") for r in records if r["k"] in ("call", "log")][-3:] == [
        "receive",
        "log",
        "save",
    ]


@workflow()
async def logs_each_round(c: Context, rounds: int) -> int:
    st = await c.save(lambda: 0, key="round")
    while st < rounds:
        c.log.info("round", n=st)  # buffered: compact() must write it, not drop it
        st = await c.save(partial(int, st + 1), key="round")
        c.log.info("saved", n=st)
        await c.compact()
    await c.receive("go")
    return int(st)


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_log_lines_in_a_compacted_loop_are_kept_once_each(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(logs_each_round)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(logs_each_round, {"rounds": 4})
        await eventually(lambda: _is(h.status(), RunStatus.SUSPENDED))  # in the receive
    async with worker(conductor, hot_wait=hot_wait):  # replays the compacted log
        await h.send("go")
        assert await h.result(timeout=20) == 4
    lines = [(r.message, r.fields["n"]) for r in await h.logs()]
    assert lines == [(m, n + d) for n in range(4) for m, d in (("round", 0), ("saved", 1))]
