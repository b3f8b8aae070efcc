"""``substantial show``: a run's summary and timeline, as text and as JSON."""

from __future__ import annotations

import json
from typing import Any

from .conftest import Store, Workers, one_error_line

APP = "tests.cli.show_app:conductor"
ENTRY_KEYS = {
    "seq", "kind", "name", "at", "started_at", "duration_ms", "attempts", "error", "value",
}  # fmt: skip


def checkout(store: Store, workers: Workers) -> str:
    workers.start(APP)
    [run_id] = store.ok("start", "checkout").split()
    store.ok("send", run_id, "ship", '"by boat"')
    out = json.loads(store.ok("result", run_id, "--timeout", "30"))
    assert out == {"paid": "charged", "parcel": 8, "shipped": "by boat"}
    return run_id


def history(store: Store, run_id: str, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(store.ok("show", run_id, "--json", *args))
    return doc


def test_show_json_is_the_history_document_with_the_summary(store: Store, workers: Workers) -> None:
    run_id = checkout(store, workers)
    doc = history(store, run_id)
    assert {"run", "run_id", "entries", "next_cursor"} <= set(doc)
    assert doc["run_id"] == run_id and doc["next_cursor"] is None
    assert doc["run"]["status"] == "COMPLETED" and doc["run"]["workflow"] == "checkout"
    entries = doc["entries"]
    assert all(set(e) == ENTRY_KEYS for e in entries)
    # "ship" is sent at once: it reaches the log wherever the run took it in
    calls = [e for e in entries if e["kind"] != "event"]
    kinds = [e["kind"] for e in calls]
    assert kinds == ["save", "save", "log", "sleep", "child", "receive", "receive", "end"]
    # "ship", and the child's outcome (once, even when the parent re-sent its notice)
    events = [e["name"] for e in entries if e["kind"] == "event"]
    assert sorted(events) == sorted(["ship", f"substantial.child:{run_id}.4"])
    fetch, charge = calls[0], calls[1]
    assert (fetch["name"], fetch["value"], fetch["attempts"]) == ("fetch_price", 7, 1)
    assert (charge["name"], charge["attempts"], charge["error"]) == (
        "charge_card", 2, "card service unavailable",
    )  # fmt: skip
    for save in (fetch, charge):
        assert save["at"].startswith("show_app.py:")
        assert save["started_at"] is not None and save["duration_ms"] is not None
    assert calls[3]["value"]["due"] is not None  # the timer's due time
    assert (calls[4]["name"], calls[4]["value"]) == ("parcel", f"{run_id}.4")
    ship = next(e for e in entries if e["kind"] == "event" and e["name"] == "ship")
    assert ship["value"] == "by boat" and ship["seq"] == 5  # consumed by the receive
    assert entries[-1]["name"] == "COMPLETED"


def test_show_pages_with_limit_and_cursor(store: Store, workers: Workers) -> None:
    run_id = checkout(store, workers)
    whole = history(store, run_id)["entries"]
    got: list[dict[str, Any]] = []
    cursor: list[str] = []
    while True:
        page = history(store, run_id, "--limit", "3", *cursor)
        assert len(page["entries"]) <= 3
        got += page["entries"]
        if page["next_cursor"] is None:
            break
        cursor = ["--cursor", page["next_cursor"]]
    assert got == whole


def test_show_draws_the_timeline(store: Store, workers: Workers) -> None:
    run_id = checkout(store, workers)
    out = store.ok("show", run_id)
    for text in (
        run_id, "checkout", "COMPLETED", "fetch_price", "charge_card",
        "ConnectionError", "show_app.py:", "sleep", "until",
        "child", "parcel", "receive", "ship", "received by #5", "paid", "end",
    ):  # fmt: skip
        assert text in out, (text, out)


def test_show_of_a_failed_run_has_its_error_type_and_traceback(
    store: Store, workers: Workers
) -> None:
    workers.start(APP)
    [run_id] = store.ok("start", "crash").split()
    assert store.cli("result", run_id, "--timeout", "30").returncode == 1
    out = store.ok("show", run_id)
    assert "FAILED" in out and "LookupError" in out and "no such sku" in out
    assert "Traceback" in out and "show_app.py" in out
    end = history(store, run_id)["entries"][-1]
    assert (end["kind"], end["name"], end["error"]) == ("end", "FAILED", "no such sku")
    assert end["value"]["error_type"] == "LookupError"
    assert "show_app.py" in end["value"]["traceback"]


def test_show_of_an_unknown_run_is_exit_2_and_one_line(sqlite_store: Store) -> None:
    proc = sqlite_store.cli("show", "no-such-run")
    assert proc.returncode == 2
    assert "no-such-run" in one_error_line(proc)


def test_a_malformed_cursor_is_exit_2_and_one_line(store: Store, workers: Workers) -> None:
    workers.start(APP)
    [run_id] = store.ok("start", "crash").split()
    proc = store.cli("show", run_id, "--cursor", "nonsense")
    assert proc.returncode == 2
    assert "cursor" in one_error_line(proc)
