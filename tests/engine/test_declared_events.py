"""Declared events and idempotency keys.

``@workflow(events={...})``: ``send`` refuses an undeclared name or a payload that
does not fit, on every store, before anything is stored; ``receive`` and
``handle`` get the typed value. ``c.idempotency_key()``: one key per step, the
same on every replay and re-execution, distinct between steps and runs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from substantial import Conductor, Context, InvalidEvent, Retry, RunStatus, workflow
from substantial.testing import TestEnvironment

from .helpers import eventually, worker


class Item(BaseModel):
    sku: str
    qty: int


@workflow(events={"approved": bool, "item": Item})
async def picking(c: Context) -> dict[str, Any]:
    seen: list[str] = []
    c.handle("item", lambda item: seen.append(type(item).__name__))
    item = await c.receive("item")
    approved = await c.receive("approved")
    return {"sku": item.sku, "qty": item.qty * 2, "approved": approved, "seen": seen}


async def test_an_undeclared_name_or_a_bad_payload_is_refused_and_nothing_is_stored(
    conductor: Conductor,
) -> None:
    conductor.register(picking)
    h = await conductor.start(picking)
    with pytest.raises(InvalidEvent, match=r"declares no event 'aproved' \(it declares: approved"):
        await h.send("aproved", True)
    with pytest.raises(InvalidEvent, match=r"event 'item' of workflow 'picking' takes Item; qty"):
        await h.send("item", {"sku": "lamp", "qty": "many"})
    with pytest.raises(InvalidEvent, match="takes bool"):
        await h.send("approved", "perhaps")
    snapshot = await conductor.backend.read(h.run_id)
    assert snapshot is not None and snapshot.inbox == [] and len(snapshot.log) == 1
    assert (await conductor.backend.get_run(h.run_id)).inbox_pos == 0  # type: ignore[union-attr]

    await h.send("item", Item(sku="lamp", qty=2))
    await h.send("approved", True)
    async with worker(conductor):
        out = await h.result(timeout=30)
    assert out == {"sku": "lamp", "qty": 4, "approved": True, "seen": ["Item"]}


@workflow()
async def anything(c: Context) -> Any:
    return await c.receive("whatever")


async def test_a_workflow_that_declares_nothing_takes_any_json_event() -> None:
    async with TestEnvironment(anything, picking) as env:
        h = await env.conductor.start(anything)
        await h.send("whatever", {"free": ["form"]})
        assert await h.result(timeout=10) == {"free": ["form"]}


def test_events_must_be_a_mapping_of_names() -> None:
    with pytest.raises(TypeError, match="mapping of event names"):
        workflow(events=["approved"])(anything.fn)  # type: ignore[call-overload]


keys: list[tuple[str, str]] = []  # (run id, key) per effect call, retries included
tries: dict[tuple[str, str], int] = {}  # (run id, step label) -> calls so far


@workflow()
async def charges(c: Context) -> list[str]:
    def charge(label: str) -> str:
        n = tries[c.run_id, label] = tries.get((c.run_id, label), 0) + 1
        keys.append((c.run_id, c.idempotency_key()))
        if n == 1:
            raise ConnectionError("provider timed out")  # retried: the same key
        return c.idempotency_key()

    first = await c.save(lambda: charge("first"), retry=Retry(max_attempts=2))
    outside = c.idempotency_key()  # the next call's key: the second save's
    second = await c.save(lambda: charge("second"), retry=Retry(max_attempts=2))
    await c.receive("done")
    return [first, outside, second]


async def test_an_idempotency_key_is_one_per_step_stable_across_retries_and_replays() -> None:
    keys.clear()
    tries.clear()
    c = Conductor("memory://")
    c.register(charges)
    async with worker(c, hot_wait=0):  # the receive evicts the run: the end is a replay
        a, b = await c.start(charges, run_id="run-a"), await c.start(charges, run_id="run-b")

        async def both_waiting() -> bool:
            return all([await h.status() == RunStatus.SUSPENDED for h in (a, b)])

        await eventually(both_waiting)
        await a.send("done")
        await b.send("done")
        out_a, out_b = await a.result(timeout=10), await b.result(timeout=10)
    await c.close()
    assert out_a == ["run-a:0", "run-a:1", "run-a:1"]
    assert out_b == ["run-b:0", "run-b:1", "run-b:1"]
    by_run = [k for rid, k in keys if rid == "run-a"]
    assert by_run == ["run-a:0", "run-a:0", "run-a:1", "run-a:1"]  # retries share it


async def test_a_long_run_id_gets_a_short_digest_key() -> None:
    @workflow(name="key_only")
    async def key_only(c: Context) -> str:
        return str(await c.save(c.idempotency_key))

    async with TestEnvironment(key_only) as env:
        h1 = await env.conductor.start(key_only, run_id="x" * 80)
        h2 = await env.conductor.start(key_only, run_id="x" * 79)
        k1, k2 = await h1.result(timeout=10), await h2.result(timeout=10)
    assert k1.startswith("sub-") and len(k1) == 64 and k1 != k2
