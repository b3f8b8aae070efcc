"""The recovery commands and the worker registry, end to end on SQLite and PostgreSQL:
workers, resume, cancel --revert, fork."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import WITH_S3, Store, Workers, one_error_line, wait_until


def start(store: Store, *args: str) -> str:
    [run_id] = store.ok("start", *args).split()
    return run_id


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_workers_lists_the_live_workers(store: Store, workers: Workers) -> None:
    procs = [workers.start(), workers.start()]
    pids = {p.proc.pid for p in procs}

    def listed() -> set[int]:
        return {w["pid"] for w in json.loads(store.ok("workers", "--json"))["workers"]}

    wait_until(lambda: listed() == pids, "both workers registered")
    [doc, _] = json.loads(store.ok("workers", "--json"))["workers"]
    assert set(doc) == {
        "worker_id", "host", "pid", "queues", "workflows", "started_at", "last_beat",
    }  # fmt: skip
    assert doc["queues"] == ["default"] and "trip" in doc["workflows"]
    table = store.ok("workers")
    assert all(str(pid) in table for pid in pids)
    workers.stop_all()  # a clean stop leaves the registry at once
    assert json.loads(store.ok("workers", "--json")) == {"workers": []}


@WITH_S3
def test_resume_replays_a_failed_run_after_the_fix(store: Store, workers: Workers) -> None:
    workers.start()
    path, fixed = store.tmp / "effects", store.tmp / "fixed"
    kwargs = json.dumps({"path": str(path), "fixed": str(fixed)})
    run_id = start(store, "shaky", "--kwargs", kwargs)
    failed = store.cli("result", run_id, "--timeout", "30")
    assert failed.returncode == 1 and "bug in step three" in one_error_line(failed)
    fixed.touch()  # the fix is deployed
    assert store.ok("resume", run_id) == ""
    assert json.loads(store.ok("result", run_id, "--timeout", "30")) == "three"
    assert lines(path) == ["one", "two", "three"]  # steps one and two ran once
    again = store.cli("resume", run_id)  # a completed run is not resumable
    assert again.returncode == 2 and "only a FAILED or CANCELLED run" in one_error_line(again)


def test_cancel_revert_runs_the_compensations(store: Store, workers: Workers) -> None:
    workers.start()
    path = store.tmp / "effects"
    run_id = start(store, "trip", "--kwargs", json.dumps({"path": str(path)}))
    wait_until(lambda: len(lines(path)) == 2, "both bookings")
    assert store.ok("cancel", run_id, "--revert") == ""
    ended = store.cli("result", run_id, "--timeout", "30")
    assert ended.returncode == 1 and "reverted" in one_error_line(ended)
    assert lines(path) == ["book hotel", "book flight", "undo flight", "undo hotel"]
    [summary] = json.loads(store.ok("runs", "trip", "--json"))["runs"]
    assert summary["status"] == "REVERTED"


def test_fork_starts_a_run_from_a_step(store: Store, workers: Workers) -> None:
    workers.start()
    path, fixed = store.tmp / "effects", store.tmp / "fixed"
    fixed.touch()
    kwargs = json.dumps({"path": str(path), "fixed": str(fixed)})
    run_id = start(store, "shaky", "--kwargs", kwargs)
    assert json.loads(store.ok("result", run_id, "--timeout", "30")) == "three"
    out = store.ok("fork", run_id, "--from-step", "1", "--run-id", "forked", "--json")
    assert json.loads(out) == {"run_id": "forked"}
    assert json.loads(store.ok("result", "forked", "--timeout", "30")) == "three"
    assert lines(path) == ["one", "two", "three", "two", "three"]  # step 0 not again
    taken = store.cli("fork", run_id, "--from-step", "1", "--run-id", "forked")
    assert taken.returncode == 2 and "exists already" in one_error_line(taken)
    unknown = store.cli("fork", "no-such-run", "--from-step", "0")
    assert unknown.returncode == 2 and "no-such-run" in one_error_line(unknown)
