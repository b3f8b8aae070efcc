"""SQLite-specific behaviour beyond the shared conformance suite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from substantial import RunStatus
from substantial.backends import NewRun, RunQuery, RunUpdate, WorkerRecord
from substantial.backends import _sqlite_sql as sql
from substantial.backends.sqlite import SCHEMA_VERSION, SQLiteBackend
from substantial.errors import BackendError, SchemaVersionError

T0 = 1_700_000_000.0


def _new(run_id: str, due: float | None = T0) -> NewRun:
    return NewRun(
        run_id=run_id, workflow="wf", queue="default", first_record=b"0", created_at=T0, due_at=due
    )


async def test_open_creates_parent_dir_wal_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.db"
    b = SQLiteBackend(path, poll_interval=0.25)
    await b.open()
    await b.open()
    assert b.poll_interval == 0.25
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert row[0] == SCHEMA_VERSION
    conn.close()
    await b.close()
    await b.close()
    with pytest.raises(BackendError):
        await b.get_run("x")
    await b.open()  # reopening keeps the data and schema
    assert await b.create_run(_new("r1"))
    await b.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    b = SQLiteBackend(path)
    await b.open()
    await b.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,)
        )
    conn.close()
    with pytest.raises(SchemaVersionError):
        await SQLiteBackend(path).open()


async def test_two_instances_share_one_file(tmp_path: Path) -> None:
    a, b = SQLiteBackend(tmp_path / "s.db"), SQLiteBackend(tmp_path / "s.db")
    await a.open()
    await b.open()
    await a.create_run(_new("r1"))
    claims = await b.claim_due(
        queue="default", workflows=["wf"], limit=5, owner="b", lease_seconds=10, now=T0
    )
    assert [c.run_id for c in claims] == ["r1"]
    assert (
        await a.claim_due(
            queue="default", workflows=["wf"], limit=5, owner="a", lease_seconds=10, now=T0
        )
        == []
    )
    await a.deliver("r1", b"ev", now=T0 + 1)
    update = RunUpdate(status=RunStatus.SUSPENDED, release=True, due_at=T0 + 100)
    await b.append(
        "r1", token=claims[0].token, expected_len=1, records=[b"1"], update=update, now=T0 + 2
    )
    run = await a.get_run("r1")
    assert run is not None and run.due_at == T0 + 2 and run.lease_owner is None
    await a.close()
    await b.close()


async def test_result_round_trip_and_unset_result_is_kept(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "s.db")
    await b.open()
    await b.create_run(_new("r1"))
    [c] = await b.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=10, now=T0
    )
    await b.append(
        "r1",
        token=c.token,
        expected_len=1,
        records=[b"1"],
        update=RunUpdate(result={"a": [1, "x", None, 1.5]}),
        now=T0,
    )
    await b.append(
        "r1", token=c.token, expected_len=2, records=[b"2"], update=RunUpdate(inbox_pos=0), now=T0
    )
    run = await b.get_run("r1")
    assert run is not None and run.result == {"a": [1, "x", None, 1.5]}
    assert run.lease_owner == "w" and run.status == RunStatus.RUNNING
    await b.close()


async def test_corrupt_overwrites_one_record(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "s.db")
    await b.open()
    await b.create_run(_new("r1"))
    await b.corrupt("r1", 0, b"\xffgarbage")
    snap = await b.read("r1")
    assert snap is not None and snap.log == [b"\xffgarbage"]
    with pytest.raises(IndexError):
        await b.corrupt("r1", 5, b"x")
    assert b.calls["create_run"] == 1 and b.calls["read"] == 1
    await b.close()


_VERSION_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('schema_version', 1);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, queue TEXT NOT NULL,
    status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, ended_at REAL,
    due_at REAL, result TEXT, error TEXT, log_len INTEGER NOT NULL DEFAULT 0,
    inbox_pos INTEGER NOT NULL DEFAULT 0, last_inbox_id INTEGER NOT NULL DEFAULT 0,
    lease_token INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, parent_id TEXT
);
CREATE INDEX runs_claim ON runs (queue, due_at);
CREATE INDEX runs_created ON runs (created_at, run_id);
CREATE TABLE log (
    run_id TEXT NOT NULL, pos INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (run_id, pos)
) WITHOUT ROWID;
CREATE TABLE inbox (
    run_id TEXT NOT NULL, id INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (run_id, id)
) WITHOUT ROWID;
INSERT INTO runs (run_id, workflow, queue, status, created_at, due_at, log_len)
    VALUES ('old', 'wf', 'default', 'PENDING', 1700000000.0, 1700000000.0, 1);
INSERT INTO log VALUES ('old', 0, x'30');
"""


async def test_a_version_1_file_is_upgraded_in_place_with_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_VERSION_1)
    conn.close()
    b = SQLiteBackend(path)
    await b.open()
    try:
        old = await b.get_run("old")
        assert old is not None and old.error_type is None and old.log_len == 1
        [c] = await b.claim_due(queue="default", workflows=["wf"], limit=1, owner="w",
                                lease_seconds=30, now=T0)  # fmt: skip
        update = RunUpdate(status=RunStatus.FAILED, error="e", error_type="KeyError", ended_at=T0)
        await b.append("old", token=c.token, expected_len=1, records=[b"x"], update=update, now=T0)
        run = await b.get_run("old")
        assert run is not None and run.error_type == "KeyError"
        info = WorkerRecord(worker_id="w", host="h", pid=1, queues=("default",),
                            workflows=("wf",), started_at=T0, lease_seconds=30)  # fmt: skip
        await b.register_worker(info, now=T0)  # version 3: the workers table
        assert [w.worker_id for w in await b.list_workers(now=T0)] == ["w"]
        assert await b.count_runs() == {("wf", RunStatus.FAILED): 1}
    finally:
        await b.close()
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(runs)")}
        plan = " ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql.COUNT}"))
    conn.close()
    assert row[0] == SCHEMA_VERSION == 7
    assert {"runs_wf_created", "runs_wf_status"} <= indexes  # versions 2 and 5
    assert "COVERING INDEX runs_wf_status" in plan  # count_runs never reads the table


async def _claim(b: SQLiteBackend) -> int:
    [c] = await b.claim_due(queue="default", workflows=["wf"], limit=1, owner="w",
                            lease_seconds=30, now=T0)  # fmt: skip
    return c.token


async def test_runs_made_before_schema_7_stay_unindexed_and_always_match(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_VERSION_1)
    conn.close()
    b = SQLiteBackend(path)
    await b.open()
    try:
        old = await b.get_run("old")
        assert old is not None and old.state is None  # its log holds what it published
        token = await _claim(b)
        update = RunUpdate(state={"customer": "acme"})
        await b.append("old", token=token, expected_len=1, records=[b"s"], update=update, now=T0)
        run = await b.get_run("old")
        assert run is not None and run.state is None  # no index made from half the story
        await b.create_run(_new("new"))
        found = await b.list_runs(RunQuery(state_equals=(("customer", "globex"),)))
        assert [r.run_id for r in found] == ["old"]  # the new run published nothing
    finally:
        await b.close()


async def test_state_keys_and_values_of_every_shape_round_trip_and_are_found(
    tmp_path: Path,
) -> None:
    b = SQLiteBackend(tmp_path / "s.db")
    await b.open()
    try:
        await b.create_run(_new("r1"))
        token = await _claim(b)
        state = {'say "hi"': "quoted", "back\\slash": 2, "dots.and spaces": 0.1 + 0.2,
                 "nul": "a\0b", "none": None, "big": 1e16, "ünï": True}  # fmt: skip
        await b.append("r1", token=token, expected_len=1, records=[b"s"],
                       update=RunUpdate(state=state), now=T0)  # fmt: skip
        await b.append("r1", token=token, expected_len=2, records=[b"t"],
                       update=RunUpdate(state={"none": None, "ünï": False}), now=T0)  # fmt: skip
        run = await b.get_run("r1")
        assert run is not None and run.state == {**state, "ünï": False}
        assert run.state["none"] is None and type(run.state["big"]) is float

        async def found(key: str, value: object) -> bool:
            return bool(await b.list_runs(RunQuery(state_equals=((key, value),))))

        assert await found('say "hi"', "quoted") and not await found('say "hi"', "other")
        assert await found("back\\slash", 2.0) and not await found("back\\slash", "2")
        assert await found("dots.and spaces", 0.1 + 0.2)  # (0.3 too: one step away, wider)
        assert not await found("dots.and spaces", 0.31)
        assert await found("ünï", False) and not await found("ünï", True)
        assert await found("big", 10**16)
        assert await found("nul", "a\0b") and await found("nul", "x\0y")  # no term: wider
        assert not await found("absent", "x")
    finally:
        await b.close()
