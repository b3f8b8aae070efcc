"""Where resume and fork cut a log (pure functions over decoded records)."""

from __future__ import annotations

from typing import Any

import pytest

from substantial._recovery import fork_point, resume_point
from substantial.errors import ClientError

Record = dict[str, Any]
START: Record = {"k": "start", "wf": "w", "kw": {}, "t": 0.0}


def call(s: int, **fields: Any) -> Record:
    return {"k": "call", "s": s, "p": "save", "at": "x.py:1", **fields}


def test_resume_drops_the_end_of_a_workflow_exception() -> None:
    log: list[Record] = [
        START,
        call(0, v=1),
        call(1, v=2),
        {"k": "log", "s": 2},
        {"k": "end", "status": "FAILED"},
    ]
    assert resume_point(log) == 4  # the log line stays: no failed call follows it


def test_resume_drops_a_failed_save_with_its_attempts_and_later_log_lines() -> None:
    log: list[Record] = [
        START,
        call(0, v=1),
        {"k": "event", "name": "e", "v": 1},
        {"k": "try", "s": 1, "n": 1, "retry": 1.0},
        {"k": "try", "s": 1, "n": 2, "retry": 2.0},
        call(1, err={"type": "KeyError", "msg": "x", "n": 3}),
        {"k": "log", "s": 2},
        {"k": "end", "status": "FAILED"},
    ]
    assert resume_point(log) == 3  # the event before the attempts is kept


def test_resume_never_cuts_an_event() -> None:
    log: list[Record] = [
        START,
        call(0, err={"type": "E", "msg": "x", "n": 1}),
        {"k": "event", "name": "e"},
    ]
    assert resume_point([*log, {"k": "end", "status": "FAILED"}]) == 3


def test_resume_of_a_cancelled_run_drops_only_the_end() -> None:
    log: list[Record] = [
        START,
        call(0, v=1),
        {"k": "arm", "s": 1, "due": 9.0},
        {"k": "end", "status": "CANCELLED"},
    ]
    assert resume_point(log) == 3


def test_fork_cuts_before_the_first_record_of_the_step() -> None:
    log: list[Record] = [
        START,
        call(0, v=1),
        {"k": "event", "name": "e"},
        {"k": "arm", "s": 1, "due": 5.0},
        call(1, ev=2),
        call(2, v=3),
        {"k": "end", "status": "COMPLETED"},
    ]
    assert fork_point(log, 0) == 1
    assert fork_point(log, 1) == 3  # the event before the receive's arm comes along
    assert fork_point(log, 2) == 5
    assert fork_point(log, 9) == 6  # past the last step: all but the end


def test_fork_refuses_a_negative_step_and_a_compacted_log() -> None:
    with pytest.raises(ClientError):
        fork_point([START], -1)
    with pytest.raises(ClientError, match="compacted"):
        fork_point([START, {"k": "mark"}, call(5, v=1)], 5)
