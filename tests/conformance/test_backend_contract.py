"""The storage contract. Every backend runs this file unchanged."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from substantial import RunStatus
from substantial.backends import (
    Append,
    AppendsInBatches,
    Backend,
    Claim,
    CountsRuns,
    KnowsNextDue,
    NewRun,
    PagesLog,
    RunQuery,
    RunRecord,
    RunUpdate,
    WorkerRecord,
)
from substantial.errors import LeaseLost, RunFinished, RunNotFound

T0 = 1_700_000_000.0
WF = ("wf",)


def new_run(
    run_id: str | None = None,
    *,
    due: float | None = T0,
    wf: str = "wf",
    queue: str = "default",
    first: bytes = b'{"k":"start"}',
    created: float = T0,
) -> NewRun:
    return NewRun(
        run_id=run_id or uuid.uuid4().hex,
        workflow=wf,
        queue=queue,
        first_record=first,
        created_at=created,
        due_at=due,
    )


async def claim_one(
    b: Backend, *, now: float = T0, owner: str = "w1", lease: float = 10.0
) -> Claim | None:
    claims = await b.claim_due(
        queue="default", workflows=WF, limit=1, owner=owner, lease_seconds=lease, now=now
    )
    return claims[0] if claims else None


async def test_create_run_stores_the_first_record_and_is_pending(backend: Backend) -> None:
    assert await backend.create_run(new_run("r1", first=b"first"))
    snap = await backend.read("r1")
    assert snap is not None
    assert snap.log == [b"first"]
    assert snap.inbox == []
    assert snap.run.status == RunStatus.PENDING
    assert snap.run.workflow == "wf"
    assert snap.run.log_len == 1
    assert snap.run.created_at == T0


async def test_create_run_is_idempotent_on_run_id(backend: Backend) -> None:
    assert await backend.create_run(new_run("r1", first=b"a"))
    assert not await backend.create_run(new_run("r1", first=b"b"))
    snap = await backend.read("r1")
    assert snap is not None and snap.log == [b"a"]


async def test_concurrent_creates_of_one_id_create_exactly_one_run(backend: Backend) -> None:
    results = await asyncio.gather(
        *(backend.create_run(new_run("same", first=f"{i}".encode())) for i in range(10))
    )
    assert sorted(results) == [False] * 9 + [True]
    assert len(await backend.list_runs()) == 1


async def test_read_and_get_of_unknown_run_return_none(backend: Backend) -> None:
    assert await backend.read("nope") is None
    assert await backend.get_run("nope") is None


async def test_claim_takes_due_runs_and_issues_growing_tokens(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c1 = await claim_one(backend)
    assert c1 is not None and c1.run_id == "r1"
    run = await backend.get_run("r1")
    assert run is not None
    assert run.status == RunStatus.RUNNING
    assert run.started_at == T0
    assert run.lease_owner == "w1"
    # leased: nobody else can claim it until the lease expires
    assert await claim_one(backend, owner="w2", now=T0 + 5) is None
    c2 = await claim_one(backend, owner="w2", now=T0 + 11)
    assert c2 is not None and c2.token > c1.token


async def test_claim_skips_runs_not_yet_due_or_waiting(backend: Backend) -> None:
    await backend.create_run(new_run("later", due=T0 + 60))
    await backend.create_run(new_run("waiting", due=None))
    assert await claim_one(backend) is None
    c = await claim_one(backend, now=T0 + 60)
    assert c is not None and c.run_id == "later"


async def test_a_run_is_claimable_at_exactly_its_due_time(backend: Backend) -> None:
    """Due times are not rounded on the way: a run due at ``t`` is claimable at
    ``now == t`` to the last bit (a virtual clock that waits for it stands still
    there), and not a hair before."""
    due = T0 + 0.0000007  # a time an index at microseconds would round up
    await backend.create_run(new_run("r1", due=due))
    assert await claim_one(backend, now=due - 1e-6) is None
    assert await claim_one(backend, now=due) is not None


async def test_claim_only_takes_registered_workflows_and_its_queue(backend: Backend) -> None:
    await backend.create_run(new_run("other-wf", wf="unknown"))
    await backend.create_run(new_run("other-q", queue="q2"))
    assert await claim_one(backend) is None
    run = await backend.get_run("other-wf")
    assert run is not None and run.status == RunStatus.PENDING
    claims = await backend.claim_due(
        queue="q2", workflows=WF, limit=5, owner="w", lease_seconds=5, now=T0
    )
    assert [c.run_id for c in claims] == ["other-q"]


async def test_claim_respects_limit_and_due_order(backend: Backend) -> None:
    for i in range(5):
        await backend.create_run(new_run(f"r{i}", due=T0 - i))
    claims = await backend.claim_due(
        queue="default", workflows=WF, limit=3, owner="w", lease_seconds=5, now=T0
    )
    assert [c.run_id for c in claims] == ["r4", "r3", "r2"]


async def test_concurrent_claims_are_exclusive(backend: Backend) -> None:
    for i in range(20):
        await backend.create_run(new_run(f"r{i}"))

    async def claimer(owner: str) -> list[str]:
        got: list[str] = []
        for _ in range(10):
            cs = await backend.claim_due(
                queue="default", workflows=WF, limit=3, owner=owner, lease_seconds=30, now=T0
            )
            got += [c.run_id for c in cs]
        return got

    results = await asyncio.gather(*(claimer(f"w{i}") for i in range(4)))
    everything = [r for got in results for r in got]
    assert sorted(everything) == sorted(f"r{i}" for i in range(20))


async def test_append_with_current_token_and_length(backend: Backend) -> None:
    await backend.create_run(new_run("r1", first=b"0"))
    c = await claim_one(backend)
    assert c is not None
    n = await backend.append("r1", token=c.token, expected_len=1, records=[b"1", b"2"], now=T0)
    assert n == 3
    snap = await backend.read("r1", log_from=1)
    assert snap is not None and snap.log == [b"1", b"2"] and snap.run.log_len == 3


async def test_append_with_stale_token_is_rejected(backend: Backend) -> None:
    await backend.create_run(new_run("r1", first=b"0"))
    old = await claim_one(backend, lease=1)
    new = await claim_one(backend, now=T0 + 2, owner="w2")
    assert old is not None and new is not None
    with pytest.raises(LeaseLost):
        await backend.append("r1", token=old.token, expected_len=1, records=[b"x"], now=T0 + 2)
    await backend.append("r1", token=new.token, expected_len=1, records=[b"y"], now=T0 + 2)
    snap = await backend.read("r1")
    assert snap is not None and snap.log == [b"0", b"y"]


async def test_append_with_wrong_expected_length_is_rejected(backend: Backend) -> None:
    await backend.create_run(new_run("r1", first=b"0"))
    c = await claim_one(backend)
    assert c is not None
    with pytest.raises(LeaseLost):
        await backend.append("r1", token=c.token, expected_len=5, records=[b"x"], now=T0)
    snap = await backend.read("r1")
    assert snap is not None and snap.log == [b"0"]


async def test_racing_appends_with_same_expectation_write_once(backend: Backend) -> None:
    await backend.create_run(new_run("r1", first=b"0"))
    c = await claim_one(backend)
    assert c is not None
    outcomes = await asyncio.gather(
        *(
            backend.append("r1", token=c.token, expected_len=1, records=[f"{i}".encode()], now=T0)
            for i in range(8)
        ),
        return_exceptions=True,
    )
    assert sum(1 for o in outcomes if o == 2) == 1
    assert all(isinstance(o, LeaseLost) for o in outcomes if o != 2)
    snap = await backend.read("r1")
    assert snap is not None and len(snap.log) == 2


async def test_append_update_finishes_a_run(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    update = RunUpdate(status=RunStatus.COMPLETED, result={"x": [1, 2]}, ended_at=T0 + 1)
    await backend.append(
        "r1", token=c.token, expected_len=1, records=[b"end"], update=update, now=T0 + 1
    )
    run = await backend.get_run("r1")
    assert run is not None
    assert run.status == RunStatus.COMPLETED
    assert run.result == {"x": [1, 2]}
    assert run.ended_at == T0 + 1
    assert run.due_at is None and run.lease_owner is None
    assert await claim_one(backend, now=T0 + 100) is None


async def test_append_update_records_failure_message(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    update = RunUpdate(status=RunStatus.FAILED, error="boom: it's broken", ended_at=T0)
    await backend.append("r1", token=c.token, expected_len=1, records=[b"e"], update=update, now=T0)
    run = await backend.get_run("r1")
    assert run is not None and run.status == RunStatus.FAILED
    assert run.error == "boom: it's broken" and run.result is None


async def test_append_can_release_with_a_due_time(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    update = RunUpdate(status=RunStatus.SUSPENDED, release=True, due_at=T0 + 30)
    await backend.append("r1", token=c.token, expected_len=1, records=[b"s"], update=update, now=T0)
    run = await backend.get_run("r1")
    assert run is not None and run.status == RunStatus.SUSPENDED and run.due_at == T0 + 30
    assert await claim_one(backend, now=T0 + 29) is None
    assert await claim_one(backend, now=T0 + 30) is not None


async def test_renew_extends_lease_and_fails_for_stale_token(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend, lease=10)
    assert c is not None
    assert await backend.renew({"r1": c.token}, lease_seconds=10, now=T0 + 8) == {"r1"}
    assert await claim_one(backend, owner="w2", now=T0 + 15) is None
    c2 = await claim_one(backend, owner="w2", now=T0 + 19)
    assert c2 is not None
    assert await backend.renew({"r1": c.token}, lease_seconds=10, now=T0 + 19) == set()


async def test_renew_takes_many_leases_at_once_and_names_the_ones_still_held(
    backend: Backend,
) -> None:
    for rid in ("r1", "r2", "r3"):
        await backend.create_run(new_run(rid))
    claims = await backend.claim_due(
        queue="default", workflows=WF, limit=3, owner="w1", lease_seconds=10, now=T0
    )
    tokens = {c.run_id: c.token for c in claims}
    assert set(tokens) == {"r1", "r2", "r3"}
    # r2's lease runs out and another worker takes it; r3 is released
    assert await backend.renew({"r1": tokens["r1"], "r3": tokens["r3"]},
                               lease_seconds=10, now=T0 + 9) == {"r1", "r3"}  # fmt: skip
    assert await claim_one(backend, owner="w2", now=T0 + 11) is not None  # r2
    assert await backend.release(
        "r3", token=tokens["r3"], due_at=None, status=RunStatus.SUSPENDED, now=T0 + 11
    )
    held = await backend.renew(dict(tokens, missing=1), lease_seconds=10, now=T0 + 12)
    assert held == {"r1"}
    r1, r2, r3 = [await backend.get_run(rid) for rid in ("r1", "r2", "r3")]
    assert r1 is not None and r1.lease_expires_at == T0 + 22
    assert r2 is not None and r2.lease_owner == "w2" and r2.lease_expires_at == T0 + 21
    assert r3 is not None and r3.lease_owner is None and r3.lease_expires_at is None
    assert await backend.renew({}, lease_seconds=10, now=T0 + 12) == set()


async def test_release_sets_status_and_due_time(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    assert await backend.release(
        "r1", token=c.token, due_at=T0 + 5, status=RunStatus.SUSPENDED, now=T0
    )
    run = await backend.get_run("r1")
    assert run is not None and run.status == RunStatus.SUSPENDED and run.lease_owner is None
    assert await claim_one(backend, now=T0 + 4) is None
    c2 = await claim_one(backend, now=T0 + 5)
    assert c2 is not None
    assert not await backend.release(
        "r1", token=c.token, due_at=None, status=RunStatus.SUSPENDED, now=T0
    )


async def test_deliver_fills_inbox_in_order_and_makes_run_due(backend: Backend) -> None:
    await backend.create_run(new_run("r1", due=None))
    ids = [await backend.deliver("r1", f"e{i}".encode(), now=T0) for i in range(3)]
    assert ids == [1, 2, 3]
    snap = await backend.read("r1")
    assert snap is not None
    assert [i.data for i in snap.inbox] == [b"e0", b"e1", b"e2"]
    assert snap.run.due_at == T0
    assert await claim_one(backend) is not None


async def test_concurrent_deliveries_get_distinct_ordered_ids(backend: Backend) -> None:
    await backend.create_run(new_run("r1", due=None))
    ids = await asyncio.gather(*(backend.deliver("r1", b"%d" % i, now=T0) for i in range(20)))
    assert sorted(ids) == list(range(1, 21))
    snap = await backend.read("r1")
    assert snap is not None and [i.id for i in snap.inbox] == list(range(1, 21))


async def test_inbox_consumption_is_recorded_with_append(backend: Backend) -> None:
    await backend.create_run(new_run("r1", due=None))
    for i in range(3):
        await backend.deliver("r1", b"%d" % i, now=T0)
    c = await claim_one(backend)
    assert c is not None
    await backend.append(
        "r1",
        token=c.token,
        expected_len=1,
        records=[b"ev0", b"ev1"],
        update=RunUpdate(inbox_pos=2),
        now=T0,
    )
    snap = await backend.read("r1")
    assert snap is not None
    assert snap.run.inbox_pos == 2
    assert [i.data for i in snap.inbox] == [b"2"]


async def test_a_snapshot_that_comes_with_a_claim_is_what_a_read_would_give(
    backend: Backend,
) -> None:
    """Claim.snapshot is optional; when a store attaches it, it is the run as the
    claim left it (RUNNING, the new token), its whole log and its pending inbox."""
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    await backend.append(
        "r1", token=c.token, expected_len=1, records=[b"ev0"], update=RunUpdate(inbox_pos=1),
        now=T0,
    )  # fmt: skip
    await backend.release("r1", token=c.token, due_at=T0, status=RunStatus.SUSPENDED, now=T0)
    for i in range(3):
        await backend.deliver("r1", b"%d" % i, now=T0)
    again = await claim_one(backend, now=T0 + 1)
    assert again is not None
    if again.snapshot is not None:
        assert again.snapshot == await backend.read("r1")
        assert again.snapshot.run.status == RunStatus.RUNNING
        assert again.snapshot.run.lease_token == again.token
        assert again.snapshot.log == [b'{"k":"start"}', b"ev0"]
        assert [i.data for i in again.snapshot.inbox] == [b"1", b"2"]


async def test_release_while_a_delivery_is_pending_keeps_the_run_due(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    await backend.deliver("r1", b"late", now=T0 + 1)  # arrives while leased
    await backend.release("r1", token=c.token, due_at=None, status=RunStatus.SUSPENDED, now=T0 + 2)
    run = await backend.get_run("r1")
    assert run is not None and run.due_at is not None and run.due_at <= T0 + 2
    assert await claim_one(backend, now=T0 + 2) is not None


async def test_append_release_while_a_delivery_is_pending_keeps_the_run_due(
    backend: Backend,
) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    await backend.deliver("r1", b"late", now=T0 + 1)
    update = RunUpdate(status=RunStatus.SUSPENDED, release=True, due_at=None)
    await backend.append(
        "r1", token=c.token, expected_len=1, records=[b"w"], update=update, now=T0 + 2
    )
    assert await claim_one(backend, now=T0 + 2) is not None


async def test_deliver_to_unknown_or_finished_run_is_refused(backend: Backend) -> None:
    with pytest.raises(RunNotFound):
        await backend.deliver("ghost", b"x", now=T0)
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    await backend.append(
        "r1",
        token=c.token,
        expected_len=1,
        records=[b"end"],
        update=RunUpdate(status=RunStatus.COMPLETED, result=1, ended_at=T0),
        now=T0,
    )
    with pytest.raises(RunFinished):
        await backend.deliver("r1", b"x", now=T0)


async def test_request_cancel_marks_and_makes_due(backend: Backend) -> None:
    await backend.create_run(new_run("r1", due=None))
    await backend.request_cancel("r1", now=T0)
    run = await backend.get_run("r1")
    assert run is not None and run.cancel_requested and run.due_at == T0
    assert not run.revert_requested
    with pytest.raises(RunNotFound):
        await backend.request_cancel("ghost", now=T0)


async def test_a_cancel_asking_to_revert_keeps_that_wish(backend: Backend) -> None:
    await backend.create_run(new_run("r1", due=None))
    await backend.request_cancel("r1", now=T0, revert=True)
    snap = await backend.read("r1")
    assert snap is not None and snap.run.cancel_requested and snap.run.revert_requested
    await backend.request_cancel("r1", now=T0 + 1)  # a plain cancel after it changes nothing
    run = await backend.get_run("r1")
    assert run is not None and run.revert_requested and run.due_at == T0 + 1
    await backend.create_run(new_run("r2", due=None))
    await backend.request_cancel("r2", now=T0)
    await backend.request_cancel("r2", now=T0, revert=True)  # and a revert after a plain one
    later = await backend.get_run("r2")
    assert later is not None and later.revert_requested
    [listed] = await backend.list_runs(RunQuery(run_ids=frozenset({"r2"})))
    assert listed.revert_requested


async def test_list_runs_filters_by_workflow_and_status(backend: Backend) -> None:
    await backend.create_run(new_run("a", wf="wf"))
    await backend.create_run(new_run("b", wf="other"))
    await backend.create_run(new_run("c", wf="wf"))
    await claim_one(backend)  # a or c becomes RUNNING
    runs = await backend.list_runs(RunQuery(workflow="wf"))
    assert sorted(r.run_id for r in runs) == ["a", "c"]
    pending = await backend.list_runs(RunQuery(statuses=frozenset({RunStatus.PENDING})))
    assert len(pending) == 2
    assert len(await backend.list_runs(RunQuery(limit=2))) == 2
    assert await backend.list_runs(RunQuery(limit=0)) == []
    assert await backend.list_runs(RunQuery(statuses=frozenset())) == []
    assert await backend.list_runs(RunQuery(workflow="nobody")) == []


def _ids(runs: list[RunRecord]) -> list[str]:
    return [r.run_id for r in runs]


async def test_list_runs_is_newest_first_by_created_at_then_run_id(backend: Backend) -> None:
    for rid, created in [("b", T0 + 1), ("a", T0 + 1), ("c", T0), ("d", T0 + 2), ("e", T0)]:
        await backend.create_run(new_run(rid, created=created))
    assert _ids(await backend.list_runs(RunQuery())) == ["d", "b", "a", "e", "c"]
    assert _ids(await backend.list_runs()) == ["d", "b", "a", "e", "c"]


async def test_list_runs_pages_through_every_run_exactly_once(backend: Backend) -> None:
    # ties on created_at across page boundaries, and distinct times
    for i in range(25):
        await backend.create_run(new_run(f"r{i:02}", created=T0 + i // 4))
    seen: list[str] = []
    before: tuple[float, str] | None = None
    pages = 0
    while True:
        page = await backend.list_runs(RunQuery(limit=10, before=before))
        if not page:
            break
        pages += 1
        assert len(page) <= 10
        seen += _ids(page)
        before = (page[-1].created_at, page[-1].run_id)
    assert pages == 3
    assert seen == sorted((f"r{i:02}" for i in range(25)), key=lambda r: (int(r[1:]) // 4, r),
                          reverse=True)  # fmt: skip
    # the cursor combines with the other fields
    page = await backend.list_runs(RunQuery(before=(T0 + 2, "r09"), created_after=T0 + 1, limit=3))
    assert _ids(page) == ["r08", "r07", "r06"]


async def _timeline(backend: Backend) -> None:
    """Runs t0..t4 created a second apart (t4 in another workflow); t0, t1, t2 claimed
    (started) at +10, +11, +12, oldest first; t1 and t2 failed (ended) at +20, +21."""
    for i in range(5):
        await backend.create_run(new_run(f"t{i}", created=T0 + i, wf="wf" if i < 4 else "x"))
    tokens = {}
    for i in range(3):
        c = await claim_one(backend, now=T0 + 10 + i, lease=100)
        assert c is not None and c.run_id == f"t{i}"
        tokens[c.run_id] = c.token
    for rid, ended in (("t1", T0 + 20), ("t2", T0 + 21)):
        update = RunUpdate(status=RunStatus.FAILED, error="e", ended_at=ended)
        await backend.append(rid, token=tokens[rid], expected_len=1, records=[b"end"],
                             update=update, now=ended)  # fmt: skip


async def test_list_runs_filters_on_every_field(backend: Backend) -> None:
    await _timeline(backend)
    # t3 and t4 never started, t0 never ended: None matches no bound on that time
    cases: list[tuple[RunQuery, list[str]]] = [
        (RunQuery(workflow="wf"), ["t3", "t2", "t1", "t0"]),
        (RunQuery(statuses=frozenset({RunStatus.FAILED})), ["t2", "t1"]),
        (RunQuery(statuses=frozenset({RunStatus.PENDING, RunStatus.RUNNING})), ["t4", "t3", "t0"]),
        (RunQuery(run_ids=frozenset({"t0", "t3", "ghost"})), ["t3", "t0"]),
        (RunQuery(created_after=T0 + 3), ["t4", "t3"]),
        (RunQuery(created_before=T0 + 1), ["t1", "t0"]),
        (RunQuery(created_after=T0 + 1, created_before=T0 + 2), ["t2", "t1"]),
        (RunQuery(started_after=T0 + 11), ["t2", "t1"]),
        (RunQuery(started_before=T0 + 10), ["t0"]),
        (RunQuery(started_after=T0), ["t2", "t1", "t0"]),
        (RunQuery(ended_after=T0 + 21), ["t2"]),
        (RunQuery(ended_before=T0 + 20), ["t1"]),
        (RunQuery(ended_before=T0 + 100), ["t2", "t1"]),
        (RunQuery(workflow="wf", statuses=frozenset({RunStatus.PENDING})), ["t3"]),
        (RunQuery(run_ids=frozenset({"t1", "t2"}), ended_after=T0 + 21), ["t2"]),
        (RunQuery(workflow="x", created_after=T0 + 5), []),
        (RunQuery(run_ids=frozenset()), []),
    ]
    for query, expected in cases:
        assert _ids(await backend.list_runs(query)) == expected, query


async def test_a_failure_keeps_its_error_type(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    update = RunUpdate(status=RunStatus.FAILED, error="'address'", error_type="KeyError",
                       ended_at=T0)  # fmt: skip
    await backend.append("r1", token=c.token, expected_len=1, records=[b"e"], update=update, now=T0)
    run = await backend.get_run("r1")
    assert run is not None and run.error_type == "KeyError" and run.error == "'address'"
    [listed] = await backend.list_runs(RunQuery(run_ids=frozenset({"r1"})))
    assert listed.error_type == "KeyError"
    snap = await backend.read("r1")
    assert snap is not None and snap.run.error_type == "KeyError"
    await backend.create_run(new_run("r2"))
    fresh = await backend.get_run("r2")
    assert fresh is not None and fresh.error_type is None


async def test_binary_records_round_trip_unchanged(backend: Backend) -> None:
    weird = bytes(range(256)) + b"\n\x00{}"
    await backend.create_run(new_run("r1", first=weird))
    c = await claim_one(backend)
    assert c is not None
    await backend.append("r1", token=c.token, expected_len=1, records=[weird[::-1]], now=T0)
    await backend.deliver("r1", weird, now=T0)
    snap = await backend.read("r1")
    assert snap is not None and snap.log == [weird, weird[::-1]]
    assert snap.inbox[0].data == weird


async def _hinted(stream: AsyncIterator[str], run_id: str) -> None:
    """Wait (bounded) until ``run_id`` is hinted; other hints may come first."""
    async with asyncio.timeout(10):
        async for item in stream:
            if item == run_id:
                return


async def _claimed_run(backend: Backend, run_id: str) -> int:
    await backend.create_run(new_run(run_id))
    c = await claim_one(backend)
    assert c is not None and c.run_id == run_id
    return c.token


CHANGES = ["create_run", "deliver", "release", "append_release", "request_cancel"]


@pytest.mark.parametrize("change", CHANGES)
async def test_subscribe_yields_empty_first_then_hints_every_later_change(
    backend: Backend, change: str
) -> None:
    token = 0
    if change == "deliver" or change == "request_cancel":
        await backend.create_run(new_run("r1", due=None))
    elif change != "create_run":
        token = await _claimed_run(backend, "r1")
    stream = backend.subscribe()
    try:
        async with asyncio.timeout(10):
            assert await anext(stream) == ""
        # no pause: a change right after the first item must be hinted
        if change == "create_run":
            await backend.create_run(new_run("r1"))
        elif change == "deliver":
            await backend.deliver("r1", b"x", now=T0)
        elif change == "release":
            assert await backend.release(
                "r1", token=token, due_at=None, status=RunStatus.SUSPENDED, now=T0
            )
        elif change == "append_release":
            update = RunUpdate(status=RunStatus.SUSPENDED, release=True)
            await backend.append("r1", token=token, expected_len=1, records=[b"s"],
                                 update=update, now=T0)  # fmt: skip
        else:
            await backend.request_cancel("r1", now=T0)
        await _hinted(stream, "r1")
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_a_change_racing_the_subscription_is_seen_or_hinted(backend: Backend) -> None:
    """Subscribing and creating in the same tick: the subscriber's first look, taken
    after the first item, finds the run, or the run is hinted later. Never neither."""
    for attempt in range(5):
        rid = f"race{attempt}"
        stream = backend.subscribe()
        try:
            first, created = await asyncio.gather(anext(stream), backend.create_run(new_run(rid)))
            assert first == "" and created
            claims = await backend.claim_due(
                queue="default", workflows=WF, limit=10, owner="w", lease_seconds=60, now=T0
            )
            if rid not in [c.run_id for c in claims]:
                await _hinted(stream, rid)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


# -- rewrite_log (compaction) -----------------------------------------------------


async def test_rewrite_log_replaces_the_whole_log_and_appends_carry_on(backend: Backend) -> None:
    await backend.create_run(new_run("r1", first=b"0"))
    c = await claim_one(backend)
    assert c is not None
    await backend.append("r1", token=c.token, expected_len=1, records=[b"1", b"2", b"3"], now=T0)
    await backend.deliver("r1", b"ev", now=T0)
    n = await backend.rewrite_log("r1", token=c.token, expected_len=4, records=[b"0", b"3"],
                                  now=T0)  # fmt: skip
    assert n == 2
    snap = await backend.read("r1")
    assert snap is not None and snap.log == [b"0", b"3"] and snap.run.log_len == 2
    assert [i.data for i in snap.inbox] == [b"ev"]  # the inbox is not the log's
    assert snap.run.lease_token == c.token and snap.run.status == RunStatus.RUNNING
    tail = await backend.read("r1", log_from=-1)
    assert tail is not None and tail.log == [b"3"]
    with pytest.raises(LeaseLost):  # the old length is gone
        await backend.append("r1", token=c.token, expected_len=4, records=[b"x"], now=T0)
    assert await backend.append("r1", token=c.token, expected_len=2, records=[b"4"], now=T0) == 3
    snap = await backend.read("r1", log_from=1)
    assert snap is not None and snap.log == [b"3", b"4"] and snap.run.log_len == 3


async def test_rewrite_log_is_fenced_like_append(backend: Backend) -> None:
    await backend.create_run(new_run("r1", first=b"0"))
    old = await claim_one(backend, lease=1)
    assert old is not None
    await backend.append("r1", token=old.token, expected_len=1, records=[b"1"], now=T0)
    with pytest.raises(LeaseLost):  # wrong length
        await backend.rewrite_log("r1", token=old.token, expected_len=1, records=[b"0"], now=T0)
    new = await claim_one(backend, now=T0 + 2, owner="w2")
    assert new is not None
    with pytest.raises(LeaseLost):  # stale token
        await backend.rewrite_log("r1", token=old.token, expected_len=2, records=[b"0"],
                                  now=T0 + 2)  # fmt: skip
    with pytest.raises(RunNotFound):
        await backend.rewrite_log("ghost", token=1, expected_len=1, records=[b"0"], now=T0)
    snap = await backend.read("r1")
    assert snap is not None and snap.log == [b"0", b"1"] and snap.run.log_len == 2


# -- the worker registry ------------------------------------------------------------


def worker(
    wid: str, *, lease: float = 30.0, queues: tuple[str, ...] = ("default",)
) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid,
        host="host-1",
        pid=4242,
        queues=queues,
        workflows=("a", "b"),
        started_at=T0,
        lease_seconds=lease,
    )


async def test_registered_workers_are_listed_with_their_entry(backend: Backend) -> None:
    await backend.register_worker(worker("w:2", queues=("q1", "q2")), now=T0)
    await backend.register_worker(worker("w:1"), now=T0 + 1)
    listed = await backend.list_workers(now=T0 + 2)
    assert [w.worker_id for w in listed] == ["w:1", "w:2"]
    assert listed[1] == WorkerRecord(
        worker_id="w:2",
        host="host-1",
        pid=4242,
        queues=("q1", "q2"),
        workflows=("a", "b"),
        started_at=T0,
        lease_seconds=30.0,
        last_beat=T0,
    )
    assert listed[0].last_beat == T0 + 1


async def test_a_beat_keeps_a_worker_listed_past_its_first_lease(backend: Backend) -> None:
    await backend.register_worker(worker("w1", lease=10.0), now=T0)
    await backend.register_worker(worker("w2", lease=10.0), now=T0)
    assert await backend.beat_worker("w1", now=T0 + 8)
    listed = await backend.list_workers(now=T0 + 12)
    assert [(w.worker_id, w.last_beat) for w in listed] == [("w1", T0 + 8)]
    assert await backend.list_workers(now=T0 + 18.5) == []


async def test_a_removed_or_unknown_worker_beats_false_and_is_not_listed(
    backend: Backend,
) -> None:
    await backend.register_worker(worker("w1"), now=T0)
    await backend.remove_worker("w1")
    await backend.remove_worker("never-registered")  # no-op
    assert not await backend.beat_worker("w1", now=T0 + 1)
    assert not await backend.beat_worker("nobody", now=T0 + 1)
    assert await backend.list_workers(now=T0 + 1) == []


async def test_an_aged_out_worker_registers_again(backend: Backend) -> None:
    await backend.register_worker(worker("w1", lease=5.0), now=T0)
    assert await backend.list_workers(now=T0 + 6) == []
    # Whether or not the store dropped the dead entry, registering brings it back.
    await backend.register_worker(worker("w1", lease=5.0), now=T0 + 7)
    assert [w.last_beat for w in await backend.list_workers(now=T0 + 8)] == [T0 + 7]


# -- reopening an ended run (resume) --------------------------------------------------


async def _failed_run(backend: Backend, run_id: str) -> None:
    """A run with log [start, a, b, end] that ended FAILED."""
    await backend.create_run(new_run(run_id, first=b"start"))
    c = await claim_one(backend)
    assert c is not None
    await backend.append(run_id, token=c.token, expected_len=1, records=[b"a", b"b"], now=T0)
    end = RunUpdate(status=RunStatus.FAILED, error="boom", error_type="KeyError", ended_at=T0)
    await backend.append(
        run_id, token=c.token, expected_len=3, records=[b"end"], update=end, now=T0
    )


async def test_reopen_returns_an_ended_run_to_pending_with_its_log_cut(backend: Backend) -> None:
    await _failed_run(backend, "r1")
    assert await backend.reopen(
        "r1", status=RunStatus.FAILED, expected_len=4, keep_len=2, now=T0 + 5
    )
    snap = await backend.read("r1")
    assert snap is not None and snap.log == [b"start", b"a"]
    run = snap.run
    assert run.status == RunStatus.PENDING and run.log_len == 2 and run.due_at == T0 + 5
    assert run.ended_at is None and run.error is None and run.error_type is None
    assert run.lease_owner is None and run.started_at == T0
    # Claimable again, with a newer token; appends carry on from the cut.
    c = await claim_one(backend, now=T0 + 5)
    assert c is not None and c.run_id == "r1" and c.token == 2
    await backend.append("r1", token=c.token, expected_len=2, records=[b"b2"], now=T0 + 5)
    snap = await backend.read("r1")
    assert snap is not None and snap.log == [b"start", b"a", b"b2"]


async def test_reopen_is_fenced_on_status_and_log_length(backend: Backend) -> None:
    await _failed_run(backend, "r1")
    assert not await backend.reopen(
        "r1", status=RunStatus.CANCELLED, expected_len=4, keep_len=2, now=T0
    )
    assert not await backend.reopen(
        "r1", status=RunStatus.FAILED, expected_len=3, keep_len=2, now=T0
    )
    snap = await backend.read("r1")
    assert snap is not None and snap.run.status == RunStatus.FAILED and len(snap.log) == 4
    assert await backend.reopen("r1", status=RunStatus.FAILED, expected_len=4, keep_len=2, now=T0)
    assert not await backend.reopen(
        "r1", status=RunStatus.FAILED, expected_len=4, keep_len=2, now=T0
    )
    with pytest.raises(RunNotFound):
        await backend.reopen("ghost", status=RunStatus.FAILED, expected_len=1, keep_len=2, now=T0)


async def test_reopen_clears_the_cancel_flags_and_the_result(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    await backend.request_cancel("r1", now=T0, revert=True)
    c = await claim_one(backend)
    assert c is not None
    end = RunUpdate(status=RunStatus.CANCELLED, result={"x": 1}, ended_at=T0)
    await backend.append("r1", token=c.token, expected_len=1, records=[b"end"], update=end, now=T0)
    assert await backend.reopen(
        "r1", status=RunStatus.CANCELLED, expected_len=2, keep_len=1, now=T0
    )
    run = await backend.get_run("r1")
    assert run is not None and run.status == RunStatus.PENDING and run.result is None
    assert not run.cancel_requested and not run.revert_requested


async def test_create_run_with_more_records_starts_with_that_log(backend: Backend) -> None:
    """A fork: the run is created with a log prefix copied from another."""
    new = NewRun(
        run_id="fork",
        workflow="wf",
        queue="default",
        first_record=b"start",
        more_records=(b"a", b"\x00b", b"c"),
        created_at=T0,
        due_at=T0,
    )
    assert await backend.create_run(new)
    snap = await backend.read("fork")
    assert snap is not None and snap.log == [b"start", b"a", b"\x00b", b"c"]
    assert snap.run.log_len == 4 and snap.run.status == RunStatus.PENDING
    c = await claim_one(backend)
    assert c is not None and c.run_id == "fork"
    await backend.append("fork", token=c.token, expected_len=4, records=[b"d"], now=T0)
    snap = await backend.read("fork", log_from=3)
    assert snap is not None and snap.log == [b"c", b"d"]


# -- group commit (the stores that declare AppendsInBatches) -------------------------


def batching(backend: Backend) -> AppendsInBatches:
    if not isinstance(backend, AppendsInBatches):
        pytest.skip("this store commits each append on its own (no group commit)")
    return backend


async def test_a_batch_commits_the_appends_of_several_runs(backend: Backend) -> None:
    b = batching(backend)
    for rid in ("a", "b", "c"):
        await backend.create_run(new_run(rid, first=b"0"))
    claims = await backend.claim_due(
        queue="default", workflows=WF, limit=3, owner="w1", lease_seconds=10.0, now=T0
    )
    tokens = {c.run_id: c.token for c in claims}
    done = RunUpdate(status=RunStatus.COMPLETED, result={"ok": 1}, ended_at=T0)
    results = await b.append_batch(
        [
            Append(run_id="a", token=tokens["a"], expected_len=1, records=[b"1"], now=T0),
            Append(run_id="b", token=tokens["b"], expected_len=1, records=[b"1", b"2"], now=T0),
            Append(run_id="c", token=tokens["c"], expected_len=1, records=[b"e"], update=done,
                   now=T0),
        ]
    )  # fmt: skip
    assert results == [2, 3, 2]
    logs = {rid: (await backend.read(rid)) for rid in ("a", "b", "c")}
    assert [s.log if s else None for s in logs.values()] == [
        [b"0", b"1"],
        [b"0", b"1", b"2"],
        [b"0", b"e"],
    ]
    c = logs["c"]
    assert c is not None and c.run.status == RunStatus.COMPLETED and c.run.result == {"ok": 1}
    assert c.run.lease_owner is None  # an end in a batch releases the run as alone


async def test_a_fenced_append_in_a_batch_fails_alone(backend: Backend) -> None:
    b = batching(backend)
    for rid in ("a", "stale", "moved", "c"):
        await backend.create_run(new_run(rid, first=b"0"))
    claims = await backend.claim_due(
        queue="default", workflows=WF, limit=4, owner="w1", lease_seconds=10.0, now=T0
    )
    tok = {c.run_id: c.token for c in claims}
    results = await b.append_batch(
        [
            Append(run_id="a", token=tok["a"], expected_len=1, records=[b"1"], now=T0),
            Append(run_id="stale", token=tok["stale"] + 7, expected_len=1, records=[b"x"], now=T0),
            Append(run_id="moved", token=tok["moved"], expected_len=4, records=[b"x"], now=T0),
            Append(run_id="gone", token=1, expected_len=1, records=[b"x"], now=T0),
            Append(run_id="c", token=tok["c"], expected_len=1, records=[b"1"], now=T0),
        ]
    )  # fmt: skip
    assert results[0] == 2 and results[4] == 2
    assert isinstance(results[1], LeaseLost) and isinstance(results[2], LeaseLost)
    assert isinstance(results[3], RunNotFound)
    for rid, log in (
        ("a", [b"0", b"1"]),
        ("stale", [b"0"]),
        ("moved", [b"0"]),
        ("c", [b"0", b"1"]),
    ):
        snap = await backend.read(rid)
        assert snap is not None and snap.log == log, rid
        assert snap.run.log_len == len(log)


# -- counting runs by workflow and status --------------------------------------------

P, R, S, C, F = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SUSPENDED,
                 RunStatus.COMPLETED, RunStatus.FAILED)  # fmt: skip


async def counts(b: Backend) -> dict[tuple[str, RunStatus], int]:
    """The store's count, pairs with no run left out (a store may list them as 0)."""
    assert isinstance(b, CountsRuns)
    return {key: n for key, n in (await b.count_runs()).items() if n}


async def test_count_runs_counts_each_run_once_in_its_current_status(backend: Backend) -> None:
    assert await counts(backend) == {}
    for i in range(3):
        await backend.create_run(new_run(f"a{i}", created=T0 + i))
    await backend.create_run(new_run("b0", wf="other"))
    assert await counts(backend) == {("wf", P): 3, ("other", P): 1}

    c = await claim_one(backend)  # a0: PENDING -> RUNNING
    assert c is not None and c.run_id == "a0"
    assert await counts(backend) == {("wf", P): 2, ("wf", R): 1, ("other", P): 1}
    done = RunUpdate(status=C, result=1, ended_at=T0)  # a0: RUNNING -> COMPLETED
    await backend.append("a0", token=c.token, expected_len=1, records=[b"e"], update=done, now=T0)
    assert await counts(backend) == {("wf", P): 2, ("wf", C): 1, ("other", P): 1}

    c = await claim_one(backend)  # a1: RUNNING, then SUSPENDED by a release
    assert c is not None and c.run_id == "a1"
    assert await backend.release("a1", token=c.token, due_at=None, status=S, now=T0)
    c = await claim_one(backend)  # a2: RUNNING, then FAILED
    assert c is not None and c.run_id == "a2"
    failed = RunUpdate(status=F, error="boom", error_type="KeyError", ended_at=T0)
    await backend.append("a2", token=c.token, expected_len=1, records=[b"e"], update=failed,
                         now=T0)  # fmt: skip
    assert await counts(backend) == {("wf", S): 1, ("wf", C): 1, ("wf", F): 1, ("other", P): 1}

    # Resumed: FAILED -> PENDING; re-claimed (RUNNING again), then completed.
    assert await backend.reopen("a2", status=F, expected_len=2, keep_len=1, now=T0)
    assert await counts(backend) == {("wf", S): 1, ("wf", C): 1, ("wf", P): 1, ("other", P): 1}
    c = await claim_one(backend)
    assert c is not None and c.run_id == "a2"
    await backend.append("a2", token=c.token, expected_len=1, records=[b"e"], update=done, now=T0)
    assert await counts(backend) == {("wf", S): 1, ("wf", C): 2, ("other", P): 1}
    assert not await backend.create_run(new_run("a0"))  # a second create counts nothing
    assert await counts(backend) == {("wf", S): 1, ("wf", C): 2, ("other", P): 1}


async def test_count_runs_follows_suspends_wakeups_and_cancels(backend: Backend) -> None:
    await backend.create_run(new_run("r1"))
    c = await claim_one(backend)
    assert c is not None
    nap = RunUpdate(status=S, release=True, due_at=T0 + 5)  # an append that suspends
    await backend.append("r1", token=c.token, expected_len=1, records=[b"s"], update=nap, now=T0)
    assert await counts(backend) == {("wf", S): 1}
    await backend.deliver("r1", b"ev", now=T0 + 1)  # due again, still SUSPENDED
    await backend.request_cancel("r1", now=T0 + 1)
    assert await counts(backend) == {("wf", S): 1}
    c = await claim_one(backend, now=T0 + 1)
    assert c is not None
    assert await counts(backend) == {("wf", R): 1}
    end = RunUpdate(status=RunStatus.CANCELLED, ended_at=T0 + 1)
    await backend.append("r1", token=c.token, expected_len=2, records=[b"e"], update=end,
                         now=T0 + 1)  # fmt: skip
    assert await counts(backend) == {("wf", RunStatus.CANCELLED): 1}


async def test_count_runs_is_exact_after_concurrent_claims_and_ends(backend: Backend) -> None:
    """Workers racing on the same runs: each run still counts once, where it ended."""
    await asyncio.gather(*(backend.create_run(new_run(f"r{i:02d}")) for i in range(24)))

    async def work(owner: str) -> None:
        while claims := await backend.claim_due(
            queue="default", workflows=WF, limit=3, owner=owner, lease_seconds=10, now=T0
        ):
            for c in claims:
                status = C if int(c.run_id[1:]) % 3 else F
                end = RunUpdate(status=status, ended_at=T0)
                await backend.append(c.run_id, token=c.token, expected_len=1, records=[b"e"],
                                     update=end, now=T0)  # fmt: skip

    await asyncio.gather(*(work(f"w{i}") for i in range(4)))
    assert await counts(backend) == {("wf", C): 16, ("wf", F): 8}


async def test_read_log_page_returns_the_run_and_a_slice_of_its_log(backend: Backend) -> None:
    assert isinstance(backend, PagesLog)
    assert await backend.read_log_page("ghost", start=0, stop=5) is None
    await backend.create_run(new_run("r1", first=b"0"))
    c = await claim_one(backend)
    assert c is not None
    more = [b"1", b"2", b"\x003", b"4"]
    await backend.append("r1", token=c.token, expected_len=1, records=more, now=T0)
    found = await backend.read_log_page("r1", start=1, stop=3)
    assert found is not None
    run, log = found
    assert log == [b"1", b"2"]
    assert run.run_id == "r1" and run.status == R and run.log_len == 5
    for start, stop, expected in [(0, 5, [b"0", *more]), (3, 100, [b"\x003", b"4"]),
                                  (5, 9, []), (2, 2, []), (4, 1, []), (0, 1, [b"0"])]:  # fmt: skip
        found = await backend.read_log_page("r1", start=start, stop=stop)
        assert found is not None and found[1] == expected, (start, stop)


# -- when the next run becomes claimable (the stores that declare KnowsNextDue) ------


def knows_next_due(backend: Backend) -> KnowsNextDue:
    if not isinstance(backend, KnowsNextDue):
        pytest.skip("this store's hints do not reach other processes: workers poll it")
    return backend


async def test_next_due_is_the_earliest_due_time_or_lease_expiry(backend: Backend) -> None:
    b = knows_next_due(backend)
    assert await b.next_due(queue="default", workflows=WF, now=T0) is None
    await backend.create_run(new_run("later", due=T0 + 100))
    await backend.create_run(new_run("other-queue", due=T0 + 5, queue="q2"))
    await backend.create_run(new_run("other-wf", due=T0 + 5, wf="wf2"))
    await backend.create_run(new_run("waiting", due=None))  # waits for an event: no time
    assert await b.next_due(queue="default", workflows=WF, now=T0) == T0 + 100
    await backend.create_run(new_run("held", due=T0))
    c = await claim_one(backend, lease=30.0)  # leased until T0 + 30: claimable again then
    assert c is not None and c.run_id == "held"
    assert await b.next_due(queue="default", workflows=WF, now=T0) == T0 + 30
    done = RunUpdate(status=RunStatus.COMPLETED, result=None, ended_at=T0)
    await backend.append("held", token=c.token, expected_len=1, records=[b"e"], update=done, now=T0)
    assert await b.next_due(queue="default", workflows=WF, now=T0) == T0 + 100  # ended: gone
    assert await b.next_due(queue="default", workflows=("wf", "wf2"), now=T0) == T0 + 5
