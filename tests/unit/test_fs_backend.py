"""FSBackend specifics the conformance suite cannot see: paths, torn writes, crash leftovers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from substantial import RunStatus
from substantial.backends import NewRun, RunUpdate
from substantial.backends.fs import FSBackend
from substantial.errors import CorruptRecord, SchemaVersionError

T0 = 1_700_000_000.0


def _new(run_id: str, *, first: bytes = b"{}", due: float | None = T0) -> NewRun:
    return NewRun(
        run_id=run_id, workflow="wf", queue="default", first_record=first, created_at=T0, due_at=due
    )


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[FSBackend]:
    b = FSBackend(tmp_path / "root", fsync=False)
    await b.open()
    await b.open()  # idempotent
    yield b
    await b.close()
    await b.close()


async def _claim(b: FSBackend, now: float = T0, lease: float = 10.0) -> int:
    claims = await b.claim_due(
        queue="default", workflows=["wf"], limit=1, owner="w", lease_seconds=lease, now=now
    )
    assert len(claims) == 1
    return claims[0].token


@pytest.mark.parametrize(
    "run_id", ["../evil", "a/b", "..", ".", "", "/abs", "x\x00y", "\\..\\", "é", "z" * 1000]
)
async def test_run_ids_never_escape_the_root(fs: FSBackend, tmp_path: Path, run_id: str) -> None:
    assert await fs.create_run(_new(run_id, first=b"mine"))
    assert not await fs.create_run(_new(run_id))
    assert await fs.deliver(run_id, b"e", now=T0) == 1
    snap = await fs.read(run_id)
    assert snap is not None and snap.run.run_id == run_id and snap.log == [b"mine"]
    assert [r.run_id for r in await fs.list_runs()] == [run_id]
    assert _names(tmp_path) == ["root"]
    runs = tmp_path / "root" / "runs"
    (only,) = _names(runs)
    assert not only.startswith(".") and "/" not in only


async def test_a_torn_append_is_ignored_then_cut(fs: FSBackend, tmp_path: Path) -> None:
    await fs.create_run(_new("r1", first=b"0"))
    token = await _claim(fs)
    log = tmp_path / "root" / "runs" / "r1" / "log"
    log.write_bytes(log.read_bytes() + b"\x00\x00\x01\x00half a rec")  # a writer died mid-append
    snap = await fs.read("r1")
    assert snap is not None and snap.log == [b"0"]
    assert await fs.append("r1", token=token, expected_len=1, records=[b"1"], now=T0) == 2
    snap = await fs.read("r1")
    assert snap is not None and snap.log == [b"0", b"1"]


async def test_a_log_shorter_than_committed_is_corrupt(fs: FSBackend, tmp_path: Path) -> None:
    await fs.create_run(_new("r1", first=b"0123456789"))
    log = tmp_path / "root" / "runs" / "r1" / "log"
    log.write_bytes(log.read_bytes()[:-3])
    with pytest.raises(CorruptRecord):
        await fs.read("r1")


async def test_corrupt_helper_overwrites_one_record(fs: FSBackend) -> None:
    await fs.create_run(_new("r1", first=b"0"))
    token = await _claim(fs)
    await fs.append("r1", token=token, expected_len=1, records=[b"1", b"2"], now=T0)
    await fs.corrupt("r1", 1, b"garbage!")
    snap = await fs.read("r1", log_from=1)
    assert snap is not None and snap.log == [b"garbage!", b"2"]


async def test_crash_leftover_index_entries_are_repaired(fs: FSBackend, tmp_path: Path) -> None:
    await fs.create_run(_new("real", due=T0 + 50))
    index = tmp_path / "root" / "queues" / "default" / "index.json"
    idx = orjson.loads(index.read_bytes())
    idx["ghost"] = [T0 - 1, None, "wf", T0]  # create_run died before publishing the run
    idx["real"] = [T0 - 1, None, "wf", T0]  # an op died after lowering the entry
    index.write_bytes(orjson.dumps(idx))
    assert (
        await fs.claim_due(
            queue="default", workflows=["wf"], limit=5, owner="w", lease_seconds=5, now=T0
        )
        == []
    )
    assert orjson.loads(index.read_bytes()) == {"real": [T0 + 50, None, "wf", T0]}


async def test_rewrite_log_commits_a_new_log_file(fs: FSBackend, tmp_path: Path) -> None:
    await fs.create_run(_new("r1", first=b"0"))
    token = await _claim(fs)
    await fs.append("r1", token=token, expected_len=1, records=[b"1", b"2"], now=T0)
    run = tmp_path / "root" / "runs" / "r1"
    (run / "log.1").write_bytes(b"junk")  # a rewrite that died before its commit
    snap = await fs.read("r1")
    assert snap is not None and snap.log == [b"0", b"1", b"2"]
    assert (
        await fs.rewrite_log("r1", token=token, expected_len=3, records=[b"0", b"2"], now=T0) == 2
    )
    assert _names(run) == ["inbox", "lock", "log.1", "run.json"]  # the old log is gone
    assert (run / "log.1").read_bytes() == b"\x00\x00\x00\x010\x00\x00\x00\x012"
    assert orjson.loads((run / "run.json").read_bytes())["log_gen"] == 1
    reopened = FSBackend(tmp_path / "root", fsync=False)
    await reopened.open()
    assert await reopened.append("r1", token=token, expected_len=2, records=[b"3"], now=T0) == 3
    snap = await reopened.read("r1")
    assert snap is not None and snap.log == [b"0", b"2", b"3"] and snap.run.log_len == 3


async def test_terminal_runs_leave_the_index(fs: FSBackend, tmp_path: Path) -> None:
    await fs.create_run(_new("r1"))
    token = await _claim(fs)
    await fs.append(
        "r1",
        token=token,
        expected_len=1,
        records=[b"end"],
        update=RunUpdate(status=RunStatus.COMPLETED, result=None, ended_at=T0),
        now=T0,
    )
    index = tmp_path / "root" / "queues" / "default" / "index.json"
    assert orjson.loads(index.read_bytes()) == {}
    run = await fs.get_run("r1")
    assert run is not None and run.result is None and run.status == RunStatus.COMPLETED


async def test_renew_can_shorten_a_lease(fs: FSBackend) -> None:
    await fs.create_run(_new("r1"))
    token = await _claim(fs, lease=100)
    assert await fs.renew({"r1": token}, lease_seconds=1, now=T0) == {"r1"}
    assert await _claim(fs, now=T0 + 1) == token + 1


async def test_plain_append_touches_only_the_run(fs: FSBackend, tmp_path: Path) -> None:
    await fs.create_run(_new("r1"))
    token = await _claim(fs)
    index = tmp_path / "root" / "queues" / "default" / "index.json"
    before = index.stat().st_mtime_ns
    await fs.append(
        "r1", token=token, expected_len=1, records=[b"s"], update=RunUpdate(inbox_pos=0), now=T0
    )
    assert index.stat().st_mtime_ns == before


async def test_a_newer_store_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "format").write_bytes(b"99\n")
    with pytest.raises(SchemaVersionError):
        await FSBackend(tmp_path / "root").open()


def test_poll_interval_is_configurable(tmp_path: Path) -> None:
    assert FSBackend(tmp_path, poll_interval=2.0).poll_interval == 2.0


async def test_a_run_json_written_before_error_type_reads_none(
    fs: FSBackend, tmp_path: Path
) -> None:
    await fs.create_run(_new("r1"))
    path = tmp_path / "root" / "runs" / "r1" / "run.json"
    doc = orjson.loads(path.read_bytes())
    assert "error_type" in doc  # written by this version
    del doc["error_type"]  # as an older version wrote it
    path.write_bytes(orjson.dumps(doc))
    run = await fs.get_run("r1")
    assert run is not None and run.error_type is None and run.status == RunStatus.PENDING
    token = await _claim(fs)
    update = RunUpdate(status=RunStatus.FAILED, error="e", error_type="KeyError", ended_at=T0)
    await fs.append("r1", token=token, expected_len=1, records=[b"x"], update=update, now=T0)
    run = await fs.get_run("r1")
    assert run is not None and run.error_type == "KeyError"
