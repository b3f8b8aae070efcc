"""The exactly-once checker the crash tests rely on (pure, fast)."""

from __future__ import annotations

from .procs import Effect, check_effects

KILLED, STOPPED, LIVE, OTHER = 100, 200, 300, 400


def effs(*rows: tuple[str, int, int]) -> list[Effect]:
    return [Effect(run, step, pid, float(i), i) for i, (run, step, pid) in enumerate(rows)]


def test_each_step_once_is_fine() -> None:
    rows = effs(("r", 0, LIVE), ("r", 1, LIVE), ("s", 0, OTHER))
    assert check_effects(rows, expected={"r": 2, "s": 1})


def test_missing_and_unexpected_steps_and_runs() -> None:
    report = check_effects(effs(("r", 0, LIVE), ("r", 5, LIVE), ("x", 0, LIVE)), expected={"r": 2})
    text = "\n".join(report.violations)
    assert "steps [1] never ran" in text
    assert "unexpected steps [5]" in text
    assert "unknown runs" in text


def test_a_killed_worker_may_have_run_its_last_step() -> None:
    rows = effs(("r", 0, KILLED), ("r", 1, KILLED), ("r", 1, LIVE), ("r", 2, LIVE))
    report = check_effects(rows, expected={"r": 3}, killed={KILLED})
    assert report, report.violations
    assert len(report.excused) == 1


def test_a_duplicate_without_a_kill_is_a_violation() -> None:
    rows = effs(("r", 0, LIVE), ("r", 1, LIVE), ("r", 1, OTHER))
    assert not check_effects(rows, expected={"r": 2})
    assert not check_effects(rows, expected={"r": 2}, killed={OTHER})  # the wrong one died
    assert check_effects(rows, expected={"r": 2}, killed={LIVE})  # LIVE died in step 1


def test_the_killed_execution_must_be_the_pids_last_for_the_run() -> None:
    # the killed worker re-ran step 0 after step 1 was recorded: not legitimate
    rows = effs(("r", 0, KILLED), ("r", 1, KILLED), ("r", 0, LIVE))
    assert not check_effects(rows, killed={KILLED})


def test_the_killed_execution_must_come_first() -> None:
    # a live worker ran it, then a (later killed) worker ran it again: not legitimate
    rows = effs(("r", 0, LIVE), ("r", 0, KILLED))
    assert not check_effects(rows, killed={KILLED})


def test_two_kills_in_the_same_step() -> None:
    rows = effs(("r", 0, KILLED), ("r", 0, KILLED + 1), ("r", 0, LIVE))
    assert check_effects(rows, killed={KILLED, KILLED + 1})


def test_a_fenced_worker_may_finish_the_step_it_was_frozen_in() -> None:
    before = effs(("r", 0, STOPPED), ("r", 0, LIVE), ("r", 1, LIVE))
    after = effs(("r", 0, LIVE), ("r", 0, STOPPED), ("r", 1, LIVE))
    assert check_effects(before, expected={"r": 2}, stopped={STOPPED})
    assert check_effects(after, expected={"r": 2}, stopped={STOPPED})


def test_a_fenced_worker_must_not_go_on() -> None:
    rows = effs(("r", 0, STOPPED), ("r", 0, LIVE), ("r", 1, STOPPED), ("r", 1, LIVE))
    assert not check_effects(rows, expected={"r": 2}, stopped={STOPPED})
