"""A real run's history on every store: names, timings, retries, waits, children,
the end; replays leave recorded timings alone; old logs replay and display."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import orjson
import pytest

from substantial import Conductor, Context, Retry, RunNotFound, RunStatus, workflow
from substantial._history import HistoryEntry

from .helpers import eventually, worker

calls: list[str] = []
FAST = Retry(max_attempts=3, backoff=timedelta(milliseconds=10))


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    _flaky.failures = 1


def fetch_price() -> int:
    calls.append("fetch")
    return 7


class _Flaky:
    failures = 1

    def __call__(self) -> str:
        calls.append("flaky")
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the card service is down")
        return "charged"


_flaky = _Flaky()


def flaky_charge() -> str:
    return _flaky()


@workflow()
async def kid(c: Context, n: int = 1) -> int:
    return n + 1


@workflow()
async def shop(c: Context) -> dict[str, Any]:
    price = await c.save(fetch_price)
    doubled = await c.save(lambda: price * 2)  # a lambda: named by its location
    await c.save(lambda: None, name="audit")
    paid = await c.save(flaky_charge, retry=FAST)
    c.log.info("paid", amount=doubled)
    await c.sleep(0.01)
    child = await c.start_child(kid, {"n": doubled})
    got = await c.receive("ship")
    return {"paid": paid, "child": await child.result(), "got": got}


def by_kind(entries: list[HistoryEntry], kind: str) -> list[HistoryEntry]:
    return [e for e in entries if e.kind == kind]


async def test_a_runs_history_names_times_and_counts_its_calls(conductor: Conductor) -> None:
    conductor.register(shop, kid)
    async with worker(conductor):
        h = await conductor.start(shop)
        await eventually(lambda: _has(conductor, h.run_id, "receive"))
        await h.send("ship", {"to": "home"})
        assert (await h.result(timeout=20))["paid"] == "charged"
    history = await conductor.history(h.run_id)
    assert history.run_id == h.run_id and history.next_cursor is None
    assert history.summary is not None and history.summary.status == RunStatus.COMPLETED
    entries = history.entries
    kinds = [e.kind for e in entries]
    assert kinds[:8] == ["save", "save", "save", "save", "log", "sleep", "child", "receive"]
    assert kinds[-1] == "end"
    # then the "ship" event, the child's outcome (an event, once, though the parent
    # may have sent it again) and its receive, in the order they reached the log
    # (the child may end before or after its receive arms)
    assert sorted(kinds[8:-1]) == ["event", "event", "receive"]

    fetch, lam, audit, charge = by_kind(entries, "save")
    assert fetch.name == "fetch_price" and fetch.value == 7
    assert lam.name is not None and lam.name.startswith("test_history.py:")
    assert audit.name == "audit"
    assert charge.name == "flaky_charge"
    assert (charge.attempts, charge.error, charge.error_type) == (
        2, "the card service is down", "ConnectionError",
    )  # fmt: skip
    for save in (fetch, lam, audit, charge):
        assert save.at is not None and save.at.startswith("test_history.py:")
        assert save.started_at is not None and save.duration_ms is not None
    assert [e.seq for e in entries if e.seq is not None and e.kind != "event"] == sorted(
        {e.seq for e in entries if e.seq is not None}
    )

    [log] = by_kind(entries, "log")
    assert log.value == {"message": "paid", "fields": {"amount": 14}}
    [sleep] = by_kind(entries, "sleep")
    assert sleep.value is not None and sleep.value["due"] is not None
    [child] = by_kind(entries, "child")
    assert (child.name, child.value) == ("kid", f"{h.run_id}.{child.seq}")
    ship = next(e for e in by_kind(entries, "event") if e.name == "ship")
    receive = next(e for e in by_kind(entries, "receive") if e.name == "ship")
    assert ship.value == receive.value == {"to": "home"}
    assert (ship.seq, ship.at) == (receive.seq, receive.at)  # where it was consumed
    assert receive.started_at is not None and receive.duration_ms is not None
    end = entries[-1]
    assert end.name == "COMPLETED" and end.value == await h.result()


async def _has(conductor: Conductor, run_id: str, kind: str) -> bool:
    return any(e.kind == kind for e in (await conductor.history(run_id)).entries)


@workflow()
async def waits_twice(c: Context) -> int:
    a = await c.save(fetch_price)
    await c.receive("one")
    b = await c.save(fetch_price)
    await c.receive("two")
    return int(a + b)


async def test_a_replay_does_not_change_recorded_timings(conductor: Conductor) -> None:
    conductor.register(waits_twice)
    async with worker(conductor, hot_wait=0.0):  # each receive evicts: the next send replays
        h = await conductor.start(waits_twice)
        await eventually(lambda: _has(conductor, h.run_id, "receive"))
        before = by_kind((await conductor.history(h.run_id)).entries, "save")
        await h.send("one")
        await h.send("two")
        assert await h.result(timeout=20) == 14
    after = by_kind((await h.history()).entries, "save")
    assert calls == ["fetch", "fetch"]  # the replays did not run the first save again
    assert after[0] == before[0]


def first_step() -> int:
    calls.append("first")
    return 1


@workflow()
async def upgraded(c: Context) -> int:
    a = await c.save(first_step)
    await c.sleep(0.01)
    b = await c.save(fetch_price, name="renamed since")
    return int(a + b)


@pytest.mark.parametrize(
    "extra",
    [{}, {"step": "before the rename", "t0": 1_700_000_000.0, "ms": 2.0}],
    ids=["old-format", "renamed-step"],
)
async def test_an_old_log_without_the_new_fields_replays_and_displays(
    conductor: Conductor, extra: dict[str, Any]
) -> None:
    """The step name is display only: neither its absence nor a different name
    (the code's lambda is named by its location) stops the replay."""
    conductor.register(upgraded)
    h = await conductor.start(upgraded)
    backend = conductor.backend
    now = time.time()
    [claim] = await backend.claim_due(
        queue="default", workflows={"upgraded"}, limit=1, owner="old", lease_seconds=30, now=now
    )
    old = [  # what an older version wrote: no t0, ms or step
        {"k": "call", "s": 0, "p": "save", "at": "old.py:1", "v": 1, **extra},
        {"k": "arm", "s": 1, "p": "sleep", "at": "old.py:2", "due": now - 1},
    ]
    await backend.append(
        h.run_id, token=claim.token, expected_len=1,
        records=[orjson.dumps(r) for r in old], now=now,
    )  # fmt: skip
    assert await backend.release(
        h.run_id, token=claim.token, due_at=now, status=RunStatus.PENDING, now=now
    )
    async with worker(conductor):
        assert await h.result(timeout=20) == 8
    assert calls == ["fetch"]  # the recorded save was not run again
    save_a, sleep, save_b, end = (await h.history()).entries
    assert save_a.value == 1
    if not extra:
        assert (save_a.name, save_a.started_at, save_a.duration_ms) == (None, None, None)
    else:
        assert (save_a.name, save_a.duration_ms) == ("before the rename", 2.0)
    assert sleep.started_at is None and sleep.value is not None
    assert save_b.name == "renamed since" and save_b.started_at is not None
    assert end.kind == "end" and end.value == 8


@workflow()
async def broken(c: Context) -> None:
    await c.save(fetch_price)
    raise KeyError("no such sku")


async def test_a_failed_runs_end_has_its_error_type_and_traceback(conductor: Conductor) -> None:
    conductor.register(broken)
    async with worker(conductor):
        h = await conductor.start(broken)
        await eventually(lambda: _ended(h))
    end = (await h.history()).entries[-1]
    assert (end.kind, end.name, end.error_type) == ("end", "FAILED", "KeyError")
    assert end.traceback is not None and "test_history.py" in end.traceback


async def _ended(h: Any) -> bool:
    status: RunStatus = await h.status()
    return status.is_terminal


async def test_history_pages_and_an_unknown_run(conductor: Conductor) -> None:
    conductor.register(shop, kid)
    async with worker(conductor):
        h = await conductor.start(shop)
        await eventually(lambda: _has(conductor, h.run_id, "receive"))
        await h.send("ship")
        await h.result(timeout=20)
    whole = (await conductor.history(h.run_id)).entries
    got: list[HistoryEntry] = []
    cursor = None
    while True:
        page = await conductor.history(h.run_id, limit=3, cursor=cursor)
        assert len(page.entries) <= 3
        got += page.entries
        cursor = page.next_cursor
        if cursor is None:
            break
    assert got == whole
    with pytest.raises(RunNotFound):
        await conductor.history("no-such-run")
    with pytest.raises(RunNotFound):
        await conductor.history("no-such-run", limit=3)


@workflow()
async def many_steps(c: Context, n: int) -> int:
    for i in range(n):

        async def step(i: int = i) -> int:
            return i

        await c.save(step, name="step")
    return n


async def test_a_page_of_a_long_run_reads_a_slice_of_its_log(conductor: Conductor) -> None:
    """Not the whole log: one store read of about the page's size for each page."""
    conductor.register(many_steps)
    async with worker(conductor):
        h = await conductor.start(many_steps, {"n": 400})
        assert await h.result(timeout=60) == 400
    calls: dict[str, int] = conductor.backend.calls  # type: ignore[attr-defined]
    reads, slices = calls.get("read", 0), calls.get("read_log_page", 0)
    first = await conductor.history(h.run_id, limit=10)
    assert [e.seq for e in first.entries] == list(range(10))
    second = await conductor.history(h.run_id, limit=10, cursor=first.next_cursor)
    assert [e.seq for e in second.entries] == list(range(10, 20))
    assert calls.get("read", 0) == reads and calls["read_log_page"] == slices + 2
