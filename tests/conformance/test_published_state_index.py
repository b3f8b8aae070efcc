"""Published state kept with the run (``RunRecord.state``), so a search by it needs
no log read, and ``RunQuery.state_equals`` pushed down where a store can. Every
backend runs this file unchanged."""

from __future__ import annotations

import uuid
from typing import Any

from substantial import RunStatus
from substantial.backends import (
    Append,
    AppendsInBatches,
    Backend,
    Claim,
    NewRun,
    RunQuery,
    RunUpdate,
)

T0 = 1_700_000_000.0


def new_run(run_id: str | None = None, *, state: dict[str, Any] | None = None) -> NewRun:
    return NewRun(
        run_id=run_id or uuid.uuid4().hex,
        workflow="wf",
        queue="default",
        first_record=b'{"k":"start"}',
        created_at=T0,
        due_at=T0,
        state=state,
    )


async def claim(b: Backend, run_id: str) -> Claim:
    claims = await b.claim_due(
        queue="default", workflows=("wf",), limit=100, owner="w", lease_seconds=30, now=T0
    )
    return next(c for c in claims if c.run_id == run_id)


async def publish(b: Backend, c: Claim, at: int, state: dict[str, Any], **more: Any) -> None:
    await b.append(
        c.run_id,
        token=c.token,
        expected_len=at,
        records=[b'{"k":"state"}'],
        update=RunUpdate(state=state, **more),
        now=T0,
    )


async def state_of(b: Backend, run_id: str) -> Any:
    run = await b.get_run(run_id)
    assert run is not None
    return run.state


async def test_a_new_run_has_published_nothing(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    assert await state_of(backend, "r1") == {}


async def test_a_fork_starts_with_what_its_prefix_published(backend: Backend) -> None:
    await backend.create_run(new_run("r1", state={"customer": "acme"}))
    assert await state_of(backend, "r1") == {"customer": "acme"}


async def test_appends_merge_published_values_key_by_key(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim(backend, "r1")
    await publish(backend, c, 1, {"customer": "acme", "progress": {"done": 1, "of": 3}})
    await publish(backend, c, 2, {"progress": {"done": 2, "of": 3}})
    assert await state_of(backend, "r1") == {"customer": "acme", "progress": {"done": 2, "of": 3}}
    snap = await backend.read("r1")
    assert snap is not None and snap.run.state == await state_of(backend, "r1")


async def test_published_values_keep_their_json_types(backend: Backend) -> None:
    values = {
        "text": "naïve ✓",
        "int": 12345678901234,
        "float": 0.1 + 0.2,
        "flag": True,
        "nothing": None,
        "list": [1, "two", [3.5]],
        "obj": {"nested": {"deep": False}},
        "key with spaces.and.dots": 1,
    }
    await backend.create_run(new_run("r1"))
    c = await claim(backend, "r1")
    await publish(backend, c, 1, values)
    got = await state_of(backend, "r1")
    assert got == values
    assert type(got["int"]) is int and type(got["float"]) is float and got["flag"] is True


async def test_the_state_outlives_the_end_and_a_compaction(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim(backend, "r1")
    await publish(backend, c, 1, {"stage": "shipping"})
    await backend.rewrite_log("r1", token=c.token, expected_len=2, records=[b"a"], now=T0)
    end = RunUpdate(status=RunStatus.COMPLETED, result=1, ended_at=T0, state={"stage": "done"})
    await backend.append("r1", token=c.token, expected_len=1, records=[b"e"], update=end, now=T0)
    assert await state_of(backend, "r1") == {"stage": "done"}
    [listed] = await backend.list_runs(RunQuery(run_ids=frozenset({"r1"})))
    assert listed.state == {"stage": "done"}


async def test_a_batch_merges_each_runs_state(backend: Backend) -> None:
    if not isinstance(backend, AppendsInBatches):
        return  # (a store without batches has only append, tested above)
    await backend.create_run(new_run("a"))
    await backend.create_run(new_run("b"))
    claims = await backend.claim_due(
        queue="default", workflows=("wf",), limit=10, owner="w", lease_seconds=30, now=T0
    )
    ca, cb = sorted(claims, key=lambda c: c.run_id)
    got = await backend.append_batch(
        [
            Append(
                run_id=c.run_id,
                token=c.token,
                expected_len=1,
                records=[b"s"],
                update=RunUpdate(state={"who": c.run_id}),
                now=T0,
            )
            for c in (ca, cb)
        ]
    )
    assert got == [2, 2]
    assert await state_of(backend, "a") == {"who": "a"}
    assert await state_of(backend, "b") == {"who": "b"}


async def test_state_equals_never_leaves_out_a_matching_run(backend: Backend) -> None:
    published = {
        "acme-1": {"customer": "acme", "n": 1.0, "vip": True},
        "acme-2": {"customer": "acme", "n": 1, "vip": True},
        "globex": {"customer": "globex", "n": 2, "vip": False},
        "silent": {},
    }
    for run_id in published:
        await backend.create_run(new_run(run_id))
    claims = await backend.claim_due(
        queue="default", workflows=("wf",), limit=10, owner="w", lease_seconds=30, now=T0
    )
    for c in claims:
        if published[c.run_id]:
            await publish(backend, c, 1, published[c.run_id])

    async def found(**terms: Any) -> set[str]:
        query = RunQuery(state_equals=tuple(terms.items()))
        return {r.run_id for r in await backend.list_runs(query)}

    assert {"acme-1", "acme-2"} <= await found(customer="acme")
    assert {"acme-1", "acme-2"} <= await found(n=1)  # 1 == 1.0, as JSON numbers
    assert {"acme-1", "acme-2"} <= await found(customer="acme", vip=True)
    assert {"globex"} <= await found(customer="globex", n=2)
    # a narrowing may return more, but what it returns matches the rest of the query
    limited = await backend.list_runs(RunQuery(state_equals=(("customer", "acme"),), limit=1))
    assert len(limited) == 1
