"""The timeline as a pure function of hand-written log records (old and new formats)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from substantial import ClientError
from substantial._history import (
    KINDS,
    History,
    HistoryEntry,
    PageScan,
    history_page,
    page,
    timeline,
)
from substantial._shapes import entry_doc, history_doc

T = 1_700_000_000.0
ENTRY_KEYS = {
    "seq",
    "kind",
    "name",
    "at",
    "started_at",
    "duration_ms",
    "attempts",
    "error",
    "value",
}


def start() -> dict[str, Any]:
    return {"k": "start", "wf": "wf", "kw": {}, "t": T}


def when(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def only(entries: list[HistoryEntry], kind: str) -> HistoryEntry:
    [entry] = [e for e in entries if e.kind == kind]
    return entry


def test_an_old_log_without_timing_or_names_still_gives_every_entry() -> None:
    records = [
        start(),
        {"k": "call", "s": 0, "p": "save", "at": "app.py:10", "v": 42},
        {"k": "arm", "s": 1, "p": "sleep", "at": "app.py:11", "due": T + 60},
        {"k": "call", "s": 2, "p": "now", "at": "app.py:12", "v": T + 61},
        {"k": "end", "status": "COMPLETED", "v": 42},
    ]
    save, sleep, now, end = timeline(records, run="r")
    assert (save.seq, save.kind, save.name, save.at) == (0, "save", None, "app.py:10")
    assert save.started_at is None and save.duration_ms is None
    assert (save.attempts, save.error, save.value) == (1, None, 42)
    assert sleep.kind == "sleep" and sleep.value == {"due": when(T + 60).isoformat()}
    assert sleep.started_at is None and sleep.duration_ms is None
    assert (now.kind, now.value) == ("now", T + 61)
    assert (end.kind, end.name, end.value, end.seq) == ("end", "COMPLETED", 42, None)


def test_a_save_carries_its_name_start_and_duration() -> None:
    records = [
        start(),
        {"k": "call", "s": 0, "p": "save", "at": "a.py:3", "step": "charge", "t0": T, "ms": 12.5,
         "v": {"ok": True}},
    ]  # fmt: skip
    [save] = timeline(records, run="r")
    assert save.name == "charge"
    assert save.started_at == when(T)
    assert save.duration_ms == 12.5
    assert save.value == {"ok": True}


def test_a_retried_save_counts_its_attempts_and_keeps_the_last_error() -> None:
    records = [
        start(),
        {"k": "try", "s": 0, "p": "save", "at": "a.py:3", "step": "flaky", "t0": T, "ms": 5,
         "n": 1, "err": {"type": "OSError", "msg": "first"}, "retry": T + 1},
        {"k": "try", "s": 0, "p": "save", "at": "a.py:3", "step": "flaky", "t0": T + 1, "ms": 5,
         "n": 2, "err": {"type": "OSError", "msg": "second"}, "retry": T + 2},
        {"k": "call", "s": 0, "p": "save", "at": "a.py:3", "step": "flaky", "t0": T + 2,
         "ms": 1000, "v": "done"},
    ]  # fmt: skip
    [save] = timeline(records, run="r")
    assert save.attempts == 3
    assert (save.error, save.error_type) == ("second", "OSError")
    assert save.value == "done" and not save.failed  # it succeeded in the end
    assert save.started_at == when(T)
    assert save.duration_ms == 3000.0  # first start to the end of the last attempt


def test_a_save_that_gave_up_has_no_value_and_its_final_error() -> None:
    records = [
        start(),
        {"k": "call", "s": 0, "p": "save", "at": "a.py:3", "t0": T, "ms": 1,
         "err": {"type": "ValueError", "msg": "declined", "n": 1}},
    ]  # fmt: skip
    [save] = timeline(records, run="r")
    assert (save.attempts, save.error, save.error_type, save.value) == (
        1, "declined", "ValueError", None,
    )  # fmt: skip
    assert save.failed


def test_a_sleep_shows_its_due_time_and_planned_duration() -> None:
    records = [start(), {"k": "arm", "s": 0, "p": "sleep", "at": "a.py:5", "t0": T, "due": T + 90}]
    [sleep] = timeline(records, run="r")
    assert sleep.started_at == when(T)
    assert sleep.duration_ms == 90_000.0
    assert sleep.value == {"due": when(T + 90).isoformat()}


def test_an_event_consumed_by_a_receive_points_at_it() -> None:
    records = [
        start(),
        {"k": "arm", "s": 0, "p": "receive", "at": "a.py:7", "name": "go", "t0": T, "due": None},
        {"k": "event", "name": "go", "v": {"yes": 1}, "id": 1, "t": T + 4},
        {"k": "event", "name": "other", "v": None, "id": 2, "t": T + 4},
        {"k": "call", "s": 0, "p": "receive", "at": "a.py:7", "name": "go", "t0": T + 5, "ev": 2},
    ]
    receive, go, other = timeline(records, run="r")
    assert (receive.kind, receive.name, receive.value) == ("receive", "go", {"yes": 1})
    assert receive.started_at == when(T) and receive.duration_ms == 5000.0
    assert (go.kind, go.name, go.value, go.started_at) == ("event", "go", {"yes": 1}, when(T + 4))
    assert (go.seq, go.at) == (0, "a.py:7")  # where it was consumed
    assert (other.seq, other.at) == (None, None)  # never received


def test_a_receive_that_timed_out_says_so() -> None:
    records = [
        start(),
        {"k": "arm", "s": 0, "p": "receive", "at": "a.py:7", "name": "go", "due": T + 1},
        {"k": "call", "s": 0, "p": "receive", "at": "a.py:7", "name": "go", "to": True},
    ]
    [receive] = timeline(records, run="r")
    assert (receive.error, receive.error_type, receive.value) == (
        "timed out", "TimeoutError", None,
    )  # fmt: skip


def test_children_continue_logs_compaction_and_internal_names_are_mapped() -> None:
    records = [
        start(),
        {"k": "call", "s": 0, "p": "start_child", "at": "a.py:1", "name": "kid", "v": "r.0"},
        {"k": "log", "s": 1, "p": "log", "at": "a.py:2", "level": "info", "msg": "hi",
         "fields": {"n": 1}, "t": T},
        {"k": "call", "s": 2, "p": "save", "at": "a.py:3", "key": "total", "v": 3},
        {"k": "mark", "p": "compact", "next": 3, "n": 1, "from": 2},
        {"k": "call", "s": 3, "p": "compensate", "at": "a.py:4", "step": "refund", "v": None},
        {"k": "call", "s": 4, "p": "continue_using", "at": "a.py:5", "name": "wf", "v": "next-id",
         "kw": {}},
        {"k": "end", "status": "CONTINUED", "v": {"continued_to": "next-id"}},
    ]  # fmt: skip
    entries = timeline(records, run="r")
    assert [e.kind for e in entries] == [
        "child", "log", "save", "compact", "revert", "continue", "end",
    ]  # fmt: skip
    assert {e.kind for e in entries} <= KINDS
    child, log, _, mark, revert, cont, end = entries
    assert (child.name, child.value) == ("kid", "r.0")
    assert (log.name, log.value, log.started_at) == (
        "info", {"message": "hi", "fields": {"n": 1}}, when(T),
    )  # fmt: skip
    assert mark.value == {"next": 3, "n": 1, "from": 2}
    assert (revert.name, revert.attempts) == ("refund", 1)
    assert (cont.name, cont.value) == ("wf", "next-id")
    assert end.value == {"continued_to": "next-id"}


def test_the_end_of_a_failed_run_keeps_its_type_and_traceback() -> None:
    tb = 'Traceback (most recent call last):\n  File "a.py", line 3\nValueError: bad'
    records = [start(), {"k": "end", "status": "FAILED",
                         "err": {"type": "ValueError", "msg": "bad", "tb": tb}}]  # fmt: skip
    [end] = timeline(records, run="r")
    assert (end.kind, end.name, end.error, end.error_type, end.traceback) == (
        "end", "FAILED", "bad", "ValueError", tb,
    )  # fmt: skip
    assert end.value == {"error_type": "ValueError", "traceback": tb}


def test_a_call_in_progress_has_an_entry_without_outcome() -> None:
    records = [
        start(),
        {"k": "try", "s": 0, "p": "save", "at": "a.py:3", "n": 1, "t0": T, "ms": 2,
         "err": {"type": "OSError", "msg": "down"}, "retry": T + 10},
    ]  # fmt: skip
    [save] = timeline(records, run="r")
    assert (save.attempts, save.error, save.value) == (1, "down", None)


def test_the_json_shape_has_exactly_the_contract_keys() -> None:
    records = [
        start(),
        {"k": "call", "s": 0, "p": "save", "at": "a.py:3", "step": "f", "t0": T, "ms": 1, "v": 1},
        {"k": "end", "status": "COMPLETED", "v": 1},
    ]
    entries = timeline(records, run="r")
    doc = history_doc(History(run_id="r", entries=entries, next_cursor=None))
    assert set(doc) == {"run_id", "entries", "next_cursor"}
    assert all(set(e) == ENTRY_KEYS for e in doc["entries"])
    assert doc["entries"][0]["started_at"] == when(T).isoformat()
    assert entry_doc(entries[1])["kind"] == "end"


def test_pages_cover_every_entry_once_in_order() -> None:
    records = [start()] + [
        {"k": "call", "s": i, "p": "random", "at": "a.py:1", "v": i / 100} for i in range(25)
    ]
    entries = timeline(records, run="r")
    seen: list[int | None] = []
    cursor = None
    while True:
        got, cursor = page(entries, limit=10, cursor=cursor)
        seen += [e.seq for e in got]
        if cursor is None:
            break
    assert seen == list(range(25))
    assert page(entries, limit=None, cursor=None) == (entries, None)


@pytest.mark.parametrize(("limit", "cursor"), [(None, None), (7, None), (7, "h7"), (7, "h21"),
                                              (100, "h3"), (3, "h99")])  # fmt: skip
def test_a_page_built_from_records_is_the_same_page_of_the_whole_timeline(
    limit: int | None, cursor: str | None
) -> None:
    records = [start()]
    for i in range(12):
        records.append({"k": "arm", "s": i, "p": "receive", "at": "a.py:1", "name": "e", "t0": T})
        records.append({"k": "event", "name": "e", "v": i, "id": i + 1, "t": T})
        records.append({"k": "call", "s": i, "p": "receive", "at": "a.py:1", "name": "e",
                        "t0": T + 1, "ev": len(records) - 1})  # fmt: skip
    records.append({"k": "end", "status": "COMPLETED", "v": None})
    whole = timeline(records, run="r")
    assert len(whole) == 25
    entries, next_cursor = history_page(records, run="r", limit=limit, cursor=cursor)
    want, want_next = page(whole, limit=limit, cursor=cursor)
    assert entries == want
    assert (next_cursor is None) == (want_next is None)  # cursors are opaque; these differ


@pytest.mark.parametrize("cursor", ["", "x12", "h", "h-1", "12"])
def test_a_malformed_cursor_is_a_client_error(cursor: str) -> None:
    with pytest.raises(ClientError, match="history cursor"):
        page([], limit=None, cursor=cursor)


def test_a_limit_below_one_is_a_client_error() -> None:
    with pytest.raises(ClientError, match="limit"):
        page([], limit=0, cursor=None)


# -- pages read forward from the log (PageScan) ----------------------------------------


def tangled_log() -> list[dict[str, Any]]:
    """A log with what makes paging hard: retries, calls overlapping (a sleep armed
    while other calls end), events taken in long before a receive takes them, an
    event nobody took, a compaction mark, log lines, and a sleep still armed."""
    a = "a.py:1"
    recs: list[dict[str, Any]] = [start()]
    recs.append({"k": "try", "s": 0, "p": "save", "at": a, "t0": T, "n": 1,
                 "err": {"type": "E", "msg": "x"}, "retry": T + 1})  # fmt: skip
    recs.append({"k": "call", "s": 0, "p": "save", "at": a, "t0": T + 1, "v": 0, "ms": 1.0})
    recs.append({"k": "arm", "s": 1, "p": "sleep", "at": a, "t0": T, "due": T + 60})
    for s in range(2, 6):
        recs.append({"k": "call", "s": s, "p": "save", "at": a, "t0": T, "v": s})
        recs.append({"k": "log", "s": 100 + s, "p": "log", "at": a, "level": "info",
                     "msg": "m", "fields": {"s": s}, "t": T})  # fmt: skip
    early = len(recs)
    recs.append({"k": "event", "name": "go", "v": {"ok": 1}, "id": 1, "t": T})
    recs.append({"k": "call", "s": 1, "p": "sleep", "at": a, "t0": T + 60})  # the sleep ends
    for s in range(6, 9):
        recs.append({"k": "call", "s": s, "p": "random", "at": a, "v": s / 10})
    recs.append({"k": "arm", "s": 9, "p": "receive", "at": a, "name": "go", "t0": T})
    recs.append({"k": "call", "s": 9, "p": "receive", "at": a, "name": "go", "t0": T + 2,
                 "ev": early})  # fmt: skip
    recs.append({"k": "mark", "p": "compact", "next": 10, "n": 1, "from": 0})
    recs.append({"k": "event", "name": "late", "v": 2, "id": 2, "t": T})  # never taken
    recs.append({"k": "call", "s": 10, "p": "now", "at": a, "v": T})
    recs.append({"k": "arm", "s": 11, "p": "sleep", "at": a, "t0": T, "due": T + 99})
    return recs


def scanned(
    records: list[dict[str, Any]], limit: int, cursor: str | None, slice_size: int
) -> tuple[list[HistoryEntry], str | None]:
    """What the journal does with a store: read slices until the page is done."""
    scan = PageScan(limit=limit, cursor=cursor)
    while not scan.done and scan.end < len(records):
        for rec in records[scan.end : scan.end + slice_size]:
            scan.feed(rec)
    for pos in scan.missing():
        scan.recall(pos, records[pos])
    return scan.page()


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 100])
@pytest.mark.parametrize("slice_size", [1, 4, 1000])
def test_a_scanned_page_is_the_page_of_the_whole_log_with_the_same_cursor(
    limit: int, slice_size: int
) -> None:
    records = tangled_log()
    whole = timeline(records, run="r")
    seen: list[HistoryEntry] = []
    cursor: str | None = None
    while True:
        expected = history_page(records, run="r", limit=limit, cursor=cursor)
        got = scanned(records, limit, cursor, slice_size)
        assert got == expected, cursor
        seen += got[0]
        cursor = got[1]
        if cursor is None:
            break
    assert seen == whole


def test_a_page_whose_receive_took_an_event_before_it_recalls_that_event() -> None:
    records = tangled_log()
    receive = next(i for i, r in enumerate(records) if r.get("ev") is not None)
    _, cursor = history_page(records, run="r", limit=14, cursor=None)  # the receive is next
    scan = PageScan(limit=2, cursor=cursor)
    while not scan.done:
        scan.feed(records[scan.end])
    assert scan.end <= receive + 3  # read on only as far as the page needs
    assert scan.missing() == [records[receive]["ev"]]
    scan.recall(records[receive]["ev"], records[records[receive]["ev"]])
    entries, _ = scan.page()
    assert only(entries, "receive").value == {"ok": 1}


def test_a_cursor_names_the_log_position_and_the_calls_still_open() -> None:
    records = tangled_log()
    _, cursor = history_page(records, run="r", limit=2, cursor=None)
    assert cursor == "h2.4.1"  # entry 2 starts at record 4; the sleep (seq 1) is still open
    assert (
        history_page(records, run="r", limit=2, cursor="h2")[0]
        == (history_page(records, run="r", limit=2, cursor=cursor)[0])
    )  # a cursor of an older version (an entry index only) still pages
    with pytest.raises(ValueError):
        PageScan(limit=2, cursor="h2")
