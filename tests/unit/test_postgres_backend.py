"""PostgreSQL-specific behaviour beyond the shared conformance suite."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest

if os.environ.get("CI"):  # in CI the driver must be there: fail, never skip
    import asyncpg
else:
    asyncpg = pytest.importorskip("asyncpg")

from substantial import RunStatus
from substantial.backends import Append, NewRun, RunQuery, RunUpdate
from substantial.backends._postgres_sql import APPEND_RECORDS
from substantial.backends.postgres import PostgresBackend
from substantial.errors import BackendError, BackendUnavailable, LeaseLost, RunNotFound

from ..backends import POSTGRES_URL, unavailable

T0 = 1_700_000_000.0


def _new(run_id: str, due: float | None = T0) -> NewRun:
    return NewRun(
        run_id=run_id, workflow="wf", queue="default", first_record=b"0", created_at=T0, due_at=due
    )


@pytest.fixture
async def pg() -> AsyncIterator[PostgresBackend]:
    b = PostgresBackend(POSTGRES_URL, schema=f"subtest_{uuid.uuid4().hex[:12]}", poll_interval=0.5)
    try:
        await b.open()
    except Exception as exc:
        unavailable("postgres", exc)
    try:
        yield b
    finally:
        await b.drop_everything()
        await b.close()


async def _terminate(application_name: str) -> int:
    """Kill the server side of matching connections (simulates a restart)."""
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid()",
            application_name,
        )
        return len(rows)
    finally:
        await conn.close()


_BLOCKED = """SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE NOT l.granted AND a.application_name = $1)"""


async def _until_blocked(pg: PostgresBackend) -> None:
    """Wait until a connection of ``pg``'s pool waits for a lock (an ungranted entry in
    pg_locks): the condition itself, polled under a deadline, never a guessed pause."""
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        async with asyncio.timeout(10):
            while True:
                if await conn.fetchval(_BLOCKED, f"substantial:{pg.schema}"):
                    return
                await asyncio.sleep(0.01)  # pg_locks offers no event to await
    finally:
        await conn.close()


async def test_poll_interval_and_calls(pg: PostgresBackend) -> None:
    assert pg.poll_interval == 0.5
    await pg.create_run(_new("r1"))
    await pg.get_run("r1")
    await pg.get_run("r1")
    assert pg.calls["create_run"] == 1 and pg.calls["get_run"] == 2


async def test_a_claim_carries_each_run_s_first_read(pg: PostgresBackend) -> None:
    """The worker's read after a claim rides in the claim's round trip."""
    await pg.create_run(_new("r1"))
    await pg.create_run(_new("r2", due=T0 + 1))
    await pg.deliver("r2", b"e", now=T0)
    claims = await pg.claim_due(
        queue="default", workflows=["wf"], limit=5, owner="w", lease_seconds=5, now=T0 + 2
    )
    assert [c.run_id for c in claims] == ["r1", "r2"]
    for c in claims:
        assert c.snapshot is not None
        assert c.snapshot.run.lease_token == c.token
    assert [i.data for i in claims[1].snapshot.inbox] == [b"e"]  # type: ignore[union-attr]
    assert "read" not in pg.calls


async def test_unreachable_server_is_unavailable_without_the_password() -> None:
    b = PostgresBackend("postgresql://someone:s3cr3t-pw@127.0.0.1:1/db", schema="x")
    with pytest.raises(BackendUnavailable) as info:
        await b.open()
    assert "s3cr3t-pw" not in str(info.value)
    assert "127.0.0.1:1/db" in str(info.value)
    await b.close()


async def test_operations_before_open_are_refused() -> None:
    b = PostgresBackend(POSTGRES_URL, schema="never_opened")
    with pytest.raises(BackendError):
        await b.get_run("x")


async def test_pool_survives_killed_connections(pg: PostgresBackend) -> None:
    await pg.create_run(_new("r1"))
    assert await _terminate(f"substantial:{pg.schema}") >= 1
    run = await pg.get_run("r1")  # stale connections are replaced, the read retried
    assert run is not None and run.run_id == "r1"


async def test_a_repeated_append_is_lease_lost(pg: PostgresBackend) -> None:
    """What a retry after a dropped connection meets if the first attempt landed."""
    await pg.create_run(_new("r1"))
    [claim] = await pg.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=30, now=T0
    )
    assert await pg.append("r1", token=claim.token, expected_len=1, records=[b"a"], now=T0) == 2
    with pytest.raises(LeaseLost, match="log length is 2, expected 1"):
        await pg.append("r1", token=claim.token, expected_len=1, records=[b"a"], now=T0)
    with pytest.raises(RunNotFound):
        await pg.append("ghost", token=1, expected_len=1, records=[], now=T0)


async def test_results_round_trip_and_stay_unset_unless_given(pg: PostgresBackend) -> None:
    await pg.create_run(_new("r1"))
    [c] = await pg.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=30, now=T0
    )
    await pg.append(
        "r1", token=c.token, expected_len=1, records=[], update=RunUpdate(inbox_pos=0), now=T0
    )
    run = await pg.get_run("r1")
    assert run is not None and run.result is None and run.lease_owner == "w"
    value = {"nul": "a\x00b", "uni": "é😀", "n": [1, 2.5, None, True], "big": 2**62}
    await pg.append(
        "r1",
        token=c.token,
        expected_len=1,
        records=[b"end"],
        now=T0,
        update=RunUpdate(status=RunStatus.COMPLETED, result=value, ended_at=T0),
    )
    run = await pg.get_run("r1")
    assert run is not None and run.result == value and run.due_at is None


async def test_release_with_pending_cancel_makes_due_now(pg: PostgresBackend) -> None:
    await pg.create_run(_new("r1"))
    [c] = await pg.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=30, now=T0
    )
    await pg.request_cancel("r1", now=T0 + 1)
    assert await pg.release(
        "r1", token=c.token, due_at=T0 + 100, status=RunStatus.SUSPENDED, now=T0 + 2
    )
    run = await pg.get_run("r1")
    assert run is not None and run.due_at == T0 + 2 and run.lease_owner is None


async def test_subscribe_reconnects_and_says_so(pg: PostgresBackend) -> None:
    await pg.create_run(_new("r1", due=None))
    stream = pg.subscribe()
    try:
        assert await asyncio.wait_for(stream.__anext__(), 10) == ""  # LISTEN is in place
        await pg.request_cancel("r1", now=T0)
        assert await asyncio.wait_for(stream.__anext__(), 5) == "r1"
        assert await _terminate(f"substantial:{pg.schema}:hints") == 1
        assert await asyncio.wait_for(stream.__anext__(), 10) == ""
        await pg.deliver("r1", b"x", now=T0)
        assert await asyncio.wait_for(stream.__anext__(), 5) == "r1"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_close_ends_subscriptions(pg: PostgresBackend) -> None:
    stream = pg.subscribe()
    assert await asyncio.wait_for(stream.__anext__(), 10) == ""
    waiter = asyncio.ensure_future(stream.__anext__())
    await pg.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, 5)
    await pg.open()  # for the fixture's cleanup


# -- the step append's fence: a share lock on the run row --------------------------


async def _claimed(pg: PostgresBackend) -> int:
    await pg.create_run(_new("r1"))
    [claim] = await pg.claim_due(queue="default", workflows=["wf"], limit=1, owner="w",
                                 lease_seconds=30, now=T0)  # fmt: skip
    return claim.token


async def test_an_append_waiting_on_a_takeover_writes_nothing_once_it_commits(
    pg: PostgresBackend,
) -> None:
    token = await _claimed(pg)
    other = await asyncpg.connect(POSTGRES_URL)
    try:
        async with other.transaction():  # another worker's claim, not yet committed
            await other.execute(
                f'UPDATE "{pg.schema}".runs SET lease_token = lease_token + 1 WHERE run_id = $1',
                "r1",
            )
            append = asyncio.create_task(
                pg.append("r1", token=token, expected_len=1, records=[b"late"], now=T0)
            )
            await _until_blocked(pg)
            assert not append.done()  # it waits for the claim to commit or roll back
        with pytest.raises(LeaseLost):
            await append  # the claim committed: the new token fences the old holder out
    finally:
        await other.close()
    snap = await pg.read("r1")
    assert snap is not None and snap.log == [b"0"] and snap.run.log_len == 1


async def test_a_claim_skips_a_run_whose_append_is_in_flight(pg: PostgresBackend) -> None:
    token = await _claimed(pg)
    holder = await asyncpg.connect(POSTGRES_URL)
    try:
        async with holder.transaction():  # the append's statement, held open
            sql = pg._sql(APPEND_RECORDS)
            assert await holder.execute(sql, "r1", token, 1, [b"1"]) == "INSERT 0 1"
            # its lease has run out: another worker would take the run, but must not
            # while the append is in flight (the row is share-locked)
            assert await pg.claim_due(queue="default", workflows=["wf"], limit=1, owner="w2",
                                      lease_seconds=30, now=T0 + 60) == []  # fmt: skip
        [claim] = await pg.claim_due(queue="default", workflows=["wf"], limit=1, owner="w2",
                                     lease_seconds=30, now=T0 + 60)  # fmt: skip
    finally:
        await holder.close()
    snap = await pg.read("r1")  # the new holder sees the record that landed
    assert claim.token == token + 1
    assert snap is not None and snap.log == [b"0", b"1"] and snap.run.log_len == 2


async def test_a_rewrite_waits_for_an_append_in_flight_and_sees_its_records(
    pg: PostgresBackend,
) -> None:
    token = await _claimed(pg)
    holder = await asyncpg.connect(POSTGRES_URL)
    try:
        async with holder.transaction():  # the append's statement, held open
            sql = pg._sql(APPEND_RECORDS)
            assert await holder.execute(sql, "r1", token, 1, [b"1"]) == "INSERT 0 1"
            rewrite = asyncio.create_task(
                pg.rewrite_log("r1", token=token, expected_len=1, records=[b"c"], now=T0)
            )
            await _until_blocked(pg)
            assert not rewrite.done()  # the run row is share-locked by the append
        with pytest.raises(LeaseLost, match="log length is 2, expected 1"):
            await rewrite  # checked against the log as it is once the lock is taken
    finally:
        await holder.close()
    assert await pg.rewrite_log("r1", token=token, expected_len=2, records=[b"c"], now=T0) == 1
    snap = await pg.read("r1")
    assert snap is not None and snap.log == [b"c"] and snap.run.log_len == 1


async def test_published_values_of_every_shape_round_trip_and_are_found(
    pg: PostgresBackend,
) -> None:
    await pg.create_run(_new("r1"))
    [c] = await pg.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=30, now=T0
    )
    state = {'say "hi"': "quoted", "back\\slash": 2, "dots.and spaces": 0.1 + 0.2,
             "none": None, "big": 1e16, "huge": -1.5e300, "tiny": 1e-7, "ünï": True,
             "deep": {"xs": [1e20, 2**62]}}  # fmt: skip
    await pg.append("r1", token=c.token, expected_len=1, records=[b"s"],
                    update=RunUpdate(state=state), now=T0)  # fmt: skip
    run = await pg.get_run("r1")
    assert run is not None and run.state == state
    assert {k: type(v) for k, v in run.state.items()} == {k: type(v) for k, v in state.items()}
    assert type(run.state["deep"]["xs"][0]) is float and type(run.state["deep"]["xs"][1]) is int

    async def found(key: str, value: object) -> bool:
        return bool(await pg.list_runs(RunQuery(state_equals=((key, value),))))

    assert await found('say "hi"', "quoted") and not await found('say "hi"', "other")
    assert await found("back\\slash", 2.0) and not await found("back\\slash", "2")
    assert await found("dots.and spaces", 0.1 + 0.2) and not await found("dots.and spaces", 0.3)
    assert await found("ünï", True) and not await found("ünï", 1)  # JSON: true is not 1
    assert await found("big", 1e16) and await found("big", 2e16)  # no term past 2**53: wider
    assert await found("nul", "a\0b")  # jsonb holds no NUL: no term, wider
    assert not await found("absent", "x")


async def test_a_value_jsonb_cannot_hold_leaves_the_run_unindexed(pg: PostgresBackend) -> None:
    """jsonb refuses NUL characters: the run's index is dropped, never the append."""
    await pg.create_run(_new("r1"))
    await pg.create_run(NewRun(run_id="fork", workflow="wf", queue="default", first_record=b"0",
                               created_at=T0, due_at=None, state={"k": "\0"}))  # fmt: skip
    [c] = await pg.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=30, now=T0
    )
    await pg.append("r1", token=c.token, expected_len=1, records=[b"s"],
                    update=RunUpdate(state={"k": "v"}), now=T0)  # fmt: skip
    await pg.append("r1", token=c.token, expected_len=2, records=[b"s"],
                    update=RunUpdate(state={"k": "a\0b"}), now=T0)  # fmt: skip
    await pg.append("r1", token=c.token, expected_len=3, records=[b"s"],
                    update=RunUpdate(state={"k": "w"}), now=T0)  # fmt: skip
    for run_id in ("r1", "fork"):
        run = await pg.get_run(run_id)
        assert run is not None and run.state is None
    found = await pg.list_runs(RunQuery(state_equals=(("k", "v"),)))
    assert {r.run_id for r in found} == {"r1", "fork"}  # unindexed runs always match


async def test_runs_made_before_migration_9_stay_unindexed(pg: PostgresBackend) -> None:
    await pg.create_run(_new("old"))
    await pg.create_run(_new("new"))
    conn = await asyncpg.connect(POSTGRES_URL)
    try:  # what migration 9 leaves in the runs it finds
        await conn.execute(f'UPDATE "{pg.schema}".runs SET state = NULL WHERE run_id = $1', "old")
    finally:
        await conn.close()
    claims = await pg.claim_due(
        queue="default", workflows=["wf"], limit=2, owner="w", lease_seconds=30, now=T0
    )
    got = await pg.append_batch([
        Append(run_id=c.run_id, token=c.token, expected_len=1, records=[b"s"],
               update=RunUpdate(state={"customer": "acme"}), now=T0)
        for c in claims
    ])  # fmt: skip
    assert got == [2, 2]
    old, new = await pg.get_run("old"), await pg.get_run("new")
    assert old is not None and old.state is None  # no index made from half the story
    assert new is not None and new.state == {"customer": "acme"}
    found = await pg.list_runs(RunQuery(state_equals=(("customer", "globex"),)))
    assert [r.run_id for r in found] == ["old"]
