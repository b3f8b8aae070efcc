"""Every run command end to end, on SQLite and PostgreSQL, against a real worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime

from substantial.backends import RunRecord, open_backend

from .conftest import WITH_S3, Store, Workers, cli_env, command, one_error_line

SUMMARY_KEYS = {
    "run_id", "workflow", "status", "queue", "parent_id",
    "started_at", "ended_at", "result", "error", "error_type", "unserved",
}  # fmt: skip


def utc(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    assert t.utcoffset() is not None and t.utcoffset() == UTC.utcoffset(None), text
    return t


def start(store: Store, *args: str) -> str:
    out = store.ok("start", *args)
    [run_id] = out.split()
    return run_id


def test_start_prints_the_run_id_and_result_prints_its_value(
    store: Store, workers: Workers
) -> None:
    workers.start()
    run_id = start(store, "double", "--kwargs", '{"n": 21}')
    assert json.loads(store.ok("result", run_id, "--timeout", "30")) == 42


def test_start_wait_prints_the_result_on_stdout_and_the_id_on_stderr(
    store: Store, workers: Workers
) -> None:
    workers.start()
    proc = store.cli("start", "double", "--kwargs", '{"n": 4}', "--run-id", "w-1", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == 8
    assert proc.stderr.split() == ["w-1"]


def test_start_is_idempotent_on_run_id(store: Store, workers: Workers) -> None:
    workers.start()
    assert start(store, "double", "--run-id", "same", "--kwargs", '{"n": 1}') == "same"
    assert start(store, "double", "--run-id", "same", "--kwargs", '{"n": 50}') == "same"
    assert json.loads(store.ok("result", "same", "--timeout", "30")) == 2  # the first won
    listed = json.loads(store.ok("runs", "double", "--json"))["runs"]
    assert [r["run_id"] for r in listed] == ["same"]


def test_start_takes_priority_concurrency_key_and_delay(store: Store) -> None:
    start(store, "double", "--run-id", "later", "--delay", "3600", "--priority", "2",
          "--concurrency-key", "acme")  # fmt: skip
    doc = json.loads(store.ok("show", "later", "--json"))["run"]
    assert doc["status"] == "PENDING" and doc["started_at"] is None  # not claimable for an hour

    async def record() -> RunRecord | None:
        backend = open_backend(store.url)
        await backend.open()
        try:
            return await backend.get_run("later")
        finally:
            await backend.close()

    run = asyncio.run(record())
    assert run is not None and (run.priority, run.concurrency_key) == (2, "acme")
    proc = store.cli("start", "double", "--priority", "high")
    assert proc.returncode == 2 and one_error_line(proc)


def test_a_failed_run_exits_1_with_its_error_on_one_line(store: Store, workers: Workers) -> None:
    workers.start()
    proc = store.cli("start", "boom", "--kwargs", '{"message": "card declined"}', "--wait")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    run_id, error = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
    assert run_id in error and "failed" in error and "card declined" in error
    again = store.cli("result", run_id)
    assert again.returncode == 1
    assert "card declined" in one_error_line(again)


def test_an_expired_timeout_exits_1(store: Store, workers: Workers) -> None:
    workers.start()
    run_id = start(store, "approval")
    proc = store.cli("result", run_id, "--timeout", "0.2")
    assert proc.returncode == 1
    assert run_id in one_error_line(proc)
    waited = store.cli("start", "approval", "--wait", "--timeout", "0.2")
    assert waited.returncode == 1
    assert waited.stdout == ""


def test_send_delivers_an_event(store: Store, workers: Workers) -> None:
    workers.start()
    run_id = start(store, "approval")
    assert store.ok("send", run_id, "decision", '{"by": "ops", "ok": true}') == ""
    result = json.loads(store.ok("result", run_id, "--timeout", "30"))
    assert result == {"decision": {"by": "ops", "ok": True}}


def test_send_without_a_payload_sends_null(store: Store, workers: Workers) -> None:
    workers.start()
    run_id = start(store, "approval")
    store.ok("send", run_id, "decision")
    assert json.loads(store.ok("result", run_id, "--timeout", "30")) == {"decision": None}


def test_cancel_ends_the_run_cancelled_and_is_a_no_op_after(store: Store, workers: Workers) -> None:
    workers.start()
    run_id = start(store, "approval")
    assert store.ok("cancel", run_id) == ""
    proc = store.cli("result", run_id, "--timeout", "30")
    assert proc.returncode == 1
    assert "cancelled" in one_error_line(proc)
    store.ok("cancel", run_id)  # already ended: nothing to do, still 0
    [row] = json.loads(store.ok("runs", "--json", "--status", "cancelled"))["runs"]
    assert (row["run_id"], row["status"]) == (run_id, "CANCELLED")


def test_runs_json_is_the_summary_shape_newest_first(store: Store, workers: Workers) -> None:
    workers.start()
    first = start(store, "double", "--kwargs", '{"n": 1}')
    store.ok("result", first, "--timeout", "30")
    failed = store.cli("start", "boom", "--wait")
    assert failed.returncode == 1
    failed_id = failed.stderr.splitlines()[0]
    waiting = start(store, "approval", "--queue", "slow")
    doc = json.loads(store.ok("runs", "--json"))
    assert set(doc) == {"runs", "next_cursor"} and doc["next_cursor"] is None
    assert [r["run_id"] for r in doc["runs"]] == [waiting, failed_id, first]
    for row in doc["runs"]:
        assert set(row) == SUMMARY_KEYS
    pending, bad, done = doc["runs"]
    assert (pending["status"], pending["queue"], pending["started_at"]) == ("PENDING", "slow", None)
    assert pending["unserved"] is True  # the worker serves "default" only
    assert bad["unserved"] is False and done["unserved"] is False
    assert (bad["status"], bad["error"], bad["error_type"]) == ("FAILED", "boom", "SaveFailed")
    assert (done["status"], done["result"], done["workflow"]) == ("COMPLETED", 2, "double")
    assert utc(done["started_at"]) <= utc(done["ended_at"])
    assert done["parent_id"] is None


def test_runs_filters_by_workflow_status_and_filter(store: Store, workers: Workers) -> None:
    workers.start()
    ids = {n: start(store, "double", "--kwargs", json.dumps({"n": n})) for n in (1, 2, 3)}
    for run_id in ids.values():
        store.ok("result", run_id, "--timeout", "30")
    assert store.cli("start", "boom", "--wait").returncode == 1

    def listed(*args: str) -> list[str]:
        return [r["run_id"] for r in json.loads(store.ok("runs", "--json", *args))["runs"]]

    assert listed("double") == [ids[3], ids[2], ids[1]]
    assert listed("--status", "COMPLETED", "--filter", '{"gte": 4}') == [ids[3], ids[2]]
    assert listed("double", "--filter", '{"not": {"eq": 4}}') == [ids[3], ids[1]]
    assert len(listed("--status", "failed", "--status", "completed")) == 4
    assert listed("--status", "SUSPENDED") == []


def test_runs_pages_with_limit_and_cursor(store: Store) -> None:
    made = [start(store, "double", "--kwargs", json.dumps({"n": n})) for n in range(5)]
    page = json.loads(store.ok("runs", "--json", "--limit", "2"))
    seen = [r["run_id"] for r in page["runs"]]
    while page["next_cursor"] is not None:
        page = json.loads(
            store.ok("runs", "--json", "--limit", "2", "--cursor", page["next_cursor"])
        )
        seen += [r["run_id"] for r in page["runs"]]
    assert seen == made[::-1]


@WITH_S3
def test_runs_table_shows_each_run(store: Store, workers: Workers) -> None:
    workers.start()
    done = start(store, "double", "--kwargs", '{"n": 5}')
    store.ok("result", done, "--timeout", "30")
    failed = store.cli("start", "boom", "--kwargs", '{"message": "no stock"}', "--wait")
    failed_id = failed.stderr.splitlines()[0]
    table = store.ok("runs")
    for header in ("run id", "workflow", "status", "started", "duration", "result"):
        assert header in table
    [done_row] = [line for line in table.splitlines() if done in line]
    assert "COMPLETED" in done_row and "double" in done_row and "10" in done_row
    [failed_row] = [line for line in table.splitlines() if failed_id in line]
    assert "FAILED" in failed_row and "no stock" in failed_row
    assert store.ok("--json", "runs", "double") == store.ok("runs", "double", "--json")


def test_logs_prints_lines_as_text_and_json(store: Store, workers: Workers) -> None:
    workers.start()
    run_id = start(store, "double", "--kwargs", '{"n": 3}')
    store.ok("result", run_id, "--timeout", "30")
    text = store.ok("logs", run_id).splitlines()
    assert len(text) == 2
    assert "doubling" in text[0] and '"n":3' in text[0]
    assert "doubled" in text[1] and '"value":6' in text[1]
    doc = json.loads(store.ok("logs", run_id, "--json"))
    assert [(x["level"], x["message"], x["fields"]) for x in doc["logs"]] == [
        ("info", "doubling", {"n": 3}),
        ("info", "doubled", {"value": 6}),
    ]
    assert all(set(x) == {"level", "message", "fields", "at"} for x in doc["logs"])
    assert utc(doc["logs"][0]["at"]) <= utc(doc["logs"][1]["at"])


def test_logs_follow_streams_until_the_run_ends(store: Store, workers: Workers) -> None:
    workers.start()
    run_id = start(store, "approval")
    follower = subprocess.Popen(
        command("--backend", store.url, "logs", run_id, "--follow", "--json"),
        cwd=store.tmp,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())  # blocks until the line is streamed
        assert first["message"] == "waiting for approval"
        assert follower.poll() is None  # the run has not ended: still following
        store.ok("send", run_id, "decision", '"yes"')
        rest, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    [last] = [json.loads(line) for line in rest.splitlines()]
    assert (last["message"], last["fields"]) == ("decided", {"decision": "yes"})


def test_migrate_prints_the_schema_version(store: Store) -> None:
    version = int(store.ok("migrate"))
    assert version >= 1
    assert json.loads(store.ok("migrate", "--json")) == {"version": version}  # idempotent


def test_migrate_on_a_store_without_migrations(sqlite_store: Store) -> None:
    proc = sqlite_store.cli("--backend", "memory://", "migrate")
    assert proc.returncode == 0
    assert "nothing to migrate" in proc.stdout


def test_python_dash_m_substantial_lists_the_commands(sqlite_store: Store) -> None:
    out = sqlite_store.ok("--help")
    for name in ("worker", "start", "send", "cancel", "result", "runs", "logs", "migrate"):
        assert name in out


def test_the_table_prints_values_as_they_are_not_as_markup(store: Store, workers: Workers) -> None:
    workers.start()
    message = "[bold]bad[/bold] [/oops]"
    proc = store.cli("start", "boom", "--kwargs", json.dumps({"message": message}), "--wait")
    assert proc.returncode == 1
    assert message in store.ok("runs")
