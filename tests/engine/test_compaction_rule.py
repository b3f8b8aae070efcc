"""Compaction and its replay rule as pure functions over records, with no store.

``Sim`` plays a workflow against ``Replay`` the way the engine does: a call the
log answers returns the recorded value, a call at the live edge appends its
record, ``compact()`` rewrites the log. A workflow is run once without a
break, then again with a "crash" after every possible number of appended
records, each continued by a fresh replay of the log left behind: the result
must be the same, each effect must run once, the log must stay bounded.
"""

# Sim calls each function before save() returns, so loop variables in lambdas
# are bound in time (and default arguments would defeat mypy's inference).
# ruff: noqa: B023

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import pytest

from substantial import NonDeterminismError
from substantial import _records as R
from substantial._compaction import compact
from substantial._replay import Replay

T = TypeVar("T")


class Crash(Exception):
    pass


class Sim:
    def __init__(self, records: list[R.Record] | None = None, *, crash_after: int = -1) -> None:
        self.records = records if records is not None else [{"k": R.START}]
        self.replay = Replay("run", self.records, lambda ev: None)
        self.effects: list[str] = []
        self.writes = 0
        self.crash_after = crash_after
        self.longest = len(self.records)

    def _append(self, rec: R.Record) -> None:
        if self.writes == self.crash_after:
            raise Crash()
        self.writes += 1
        self.records.append(rec)
        self.replay.index_new()
        self.longest = max(self.longest, len(self.records))

    def save(self, make: Callable[[], T], key: str | None = None, at: str = "wf.py:1") -> T:
        """(``make`` is called before this returns, if at all: closures need no
        default arguments to pin their values.)"""
        step = self.replay.begin("save", None, key, at)
        final = self.replay.final(step)
        if final is not None:
            return cast(T, final["v"])
        value = make()
        rec = {"k": R.CALL, "s": step.seq, "p": "save", "at": at, "v": value}
        self._append({**rec, "key": key} if key else rec)
        self.effects.append(str(value))  # an effect counts once its record is stored
        return value

    def sleep(self, key: str | None = None) -> None:
        step = self.replay.begin("sleep", None, key, "wf.py:2")
        if not step.records:
            rec = {"k": R.ARM, "s": step.seq, "p": "sleep", "at": "wf.py:2", "due": 0}
            self._append({**rec, "key": key} if key else rec)

    def log(self, msg: str) -> None:
        step = self.replay.begin("log", None, None, "wf.py:3")
        if not step.records:
            self._append({"k": R.LOG, "s": step.seq, "p": "log", "at": "wf.py:3", "msg": msg})

    def compact(self) -> None:
        if not self.replay.compact_here():
            return
        out = compact(self.records, next_seq=self.replay.next_seq, compacts=self.replay.compacts)
        if out is not None:
            self.records = out.records
            cursor = out.position_of(self.replay.cursor)
            self.replay.reload(self.records, cursor=cursor, live=True)

    def finish(self, value: Any) -> Any:
        self.replay.check_complete()
        return value


Workflow = Callable[[Sim], Any]


def payroll(c: Sim) -> Any:
    """Keyed state drives the loop; compact() is the last call of each round."""
    st = c.save(lambda: 4, key="state")
    while st > 0:
        c.save(lambda: f"pay {st}", key="payment")
        c.sleep(key="pause")
        st = c.save(lambda: st - 1, key="state")
        c.compact()
    got = c.save(lambda: "after the loop")
    c.log("paid")
    return c.finish([got, c.save(lambda: "final")])


def poller(c: Sim) -> Any:
    """A keyed sleep after compact(): the round goes on past the compaction."""
    st = c.save(lambda: 0, key="state")
    while st < 4:
        st = c.save(lambda: st + 1, key="state")
        c.compact()
        c.sleep(key="pause")
    return c.finish([st, c.save(lambda: "done")])


def counter(c: Sim) -> Any:
    """A Python loop index, the total carried through a keyed call."""
    before = c.save(lambda: "before")
    total = 0
    for i in range(5):
        total = c.save(lambda: total + i, key="total")
        c.compact()
        c.sleep(key="pause")
    return c.finish([before, total, c.save(lambda: "after")])


def logging_loop(c: Sim) -> Any:
    """Unkeyed log lines in the loop: kept, and replayed round by round."""
    st = c.save(lambda: 3, key="state")
    while st > 0:
        c.log(f"round {st}")
        st = c.save(lambda: st - 1, key="state")
        c.compact()
    return c.finish([st, c.save(lambda: "after")])


WORKFLOWS = [payroll, poller, counter, logging_loop]


def run_through(wf: Workflow) -> tuple[Any, list[str], int]:
    sim = Sim()
    return wf(sim), sim.effects, sim.longest


@pytest.mark.parametrize("wf", WORKFLOWS, ids=lambda wf: wf.__name__)
def test_a_replay_after_any_crash_behaves_as_the_run_without_one(wf: Workflow) -> None:
    expected, effects, _ = run_through(wf)
    crashes = 0
    for crash_after in range(len(effects) * 3):
        first = Sim(crash_after=crash_after)
        try:
            wf(first)
            continue  # finished before that many writes
        except Crash:
            crashes += 1
        again = Sim(first.records)  # a fresh worker: replays the log that was left
        assert wf(again) == expected, crash_after
        assert first.effects + again.effects == effects, crash_after  # each effect once
    assert crashes > len(effects)


@pytest.mark.parametrize("wf", WORKFLOWS, ids=lambda wf: wf.__name__)
def test_a_replay_of_every_prefix_matches(wf: Workflow) -> None:
    """Replay after each write, every time (the evicted path: each wait replays)."""
    expected, effects, _ = run_through(wf)
    records: list[R.Record] | None = None
    done_effects: list[str] = []
    for _ in range(len(effects) * 3):
        sim = Sim(records, crash_after=1)
        try:
            result = wf(sim)
        except Crash:
            records = sim.records
            done_effects += sim.effects
            continue
        done_effects += sim.effects
        assert result == expected
        assert done_effects == effects
        return
    raise AssertionError("never finished")


def test_the_log_stays_bounded_whatever_the_number_of_rounds() -> None:
    def loop(c: Sim, n: int) -> Any:
        st = c.save(lambda: n, key="state")
        while st > 0:
            c.save(lambda: st, key="payment")
            c.sleep(key="pause")
            st = c.save(lambda: st - 1, key="state")
            c.compact()
        return c.finish(st)

    sizes = set()
    for n in (10, 100, 1000):
        sim = Sim()
        loop(sim, n)
        sizes.add(len(sim.records))
    assert sizes == {5}  # start, the last payment, pause and state, the mark


# -- compaction itself -----------------------------------------------------------------


def rec(k: str, s: int, **fields: Any) -> R.Record:
    return {"k": k, "s": s, "p": fields.pop("p", "save"), "at": "wf.py:1", **fields}


def test_compact_keeps_unkeyed_records_the_last_call_of_each_key_and_one_mark() -> None:
    records = [
        {"k": R.START},
        rec(R.CALL, 0, v=1),
        rec(R.CALL, 1, v="a0", key="a"),
        {"k": R.EVENT, "name": "go", "v": 1, "id": 1},
        rec(R.TRY, 2, key="a", n=1, err={}, retry=0),
        rec(R.CALL, 2, v="a1", key="a"),
        rec(R.ARM, 3, p="sleep", due=0, key="b"),
        rec(R.CALL, 4, p="receive", name="go", ev=3),
        {"k": R.MARK, "p": "compact", "next": 2, "n": 1, "from": 1},
    ]
    out = compact(records, next_seq=5, compacts=2)
    assert out is not None
    assert out.records == [
        {"k": R.START},
        rec(R.CALL, 0, v=1),
        {"k": R.EVENT, "name": "go", "v": 1, "id": 1},
        rec(R.TRY, 2, key="a", n=1, err={}, retry=0),  # an attempt stays with its call
        rec(R.CALL, 2, v="a1", key="a"),
        rec(R.ARM, 3, p="sleep", due=0, key="b"),
        rec(R.CALL, 4, p="receive", name="go", ev=2),  # the event's new position
        {"k": R.MARK, "p": "compact", "next": 5, "n": 2, "from": 1},  # the older mark goes
    ]
    assert out.origin == [0, 1, 3, 4, 5, 6, 7, 9]
    assert out.position_of(3) == 2 and out.position_of(2) == 2 and out.position_of(9) == 7


def test_compact_with_nothing_to_drop_changes_nothing() -> None:
    records = [{"k": R.START}, rec(R.CALL, 0, v=1), rec(R.CALL, 1, v=2, key="a")]
    assert compact(records, next_seq=2, compacts=1) is None
    marked = [*records, {"k": R.MARK, "p": "compact", "next": 2, "n": 1, "from": 1}]
    assert compact(marked, next_seq=2, compacts=2) is None  # only the mark would go


def test_the_stretch_starts_at_the_first_keyed_call_even_once_it_was_dropped() -> None:
    records = [{"k": R.START}, rec(R.CALL, 0, v=1), rec(R.CALL, 1, v=2, key="a")]
    first = compact([*records, rec(R.CALL, 2, v=3, key="a")], next_seq=3, compacts=1)
    assert first is not None and first.records[-1]["from"] == 1
    again = compact([*first.records, rec(R.CALL, 3, v=4, key="a")], next_seq=4, compacts=2)
    assert again is not None and again.records[-1]["from"] == 1


# -- divergences are still caught ------------------------------------------------------


def crashed_log(wf: Workflow, writes: int) -> list[R.Record]:
    sim = Sim(crash_after=writes)
    with pytest.raises(Crash):
        wf(sim)
    return sim.records


def test_a_changed_call_before_the_loop_is_a_divergence() -> None:
    log = crashed_log(counter, 8)

    def changed(c: Sim) -> Any:
        c.log("a log line where a save was")
        return counter(c)

    with pytest.raises(NonDeterminismError, match="log"):
        changed(Sim(log))


def test_a_changed_call_after_the_loop_is_a_divergence() -> None:
    done = Sim()
    payroll(done)

    def changed(c: Sim) -> Any:
        st = c.save(lambda: 4, key="state")
        while st > 0:
            c.save(lambda: f"pay {st}", key="payment")
            c.sleep(key="pause")
            st = c.save(lambda: st - 1, key="state")
            c.compact()
        c.sleep()  # where the run made a save
        return c.finish(None)

    with pytest.raises(NonDeterminismError, match="sleep"):
        changed(Sim(done.records))


def test_a_renamed_key_is_a_divergence() -> None:
    log = crashed_log(poller, 7)
    assert log[-1]["k"] != R.MARK  # the run went on after compacting

    def renamed(c: Sim) -> Any:
        st = c.save(lambda: 0, key="renamed")
        while st < 4:
            st = c.save(lambda: st + 1, key="renamed")
            c.compact()
            c.sleep(key="pause")
        return c.finish(st)

    with pytest.raises(NonDeterminismError, match="renamed"):
        renamed(Sim(log))


def test_returning_before_calls_the_log_recorded_after_the_loop_is_a_divergence() -> None:
    log = Sim()
    payroll(log)

    def shorter(c: Sim) -> Any:
        st = c.save(lambda: 4, key="state")
        while st > 0:
            c.save(lambda: f"pay {st}", key="payment")
            c.sleep(key="pause")
            st = c.save(lambda: st - 1, key="state")
            c.compact()
        return c.finish(None)  # the run went on to two saves and a log line

    with pytest.raises(NonDeterminismError, match="return"):
        shorter(Sim(log.records))


# -- a plain log: matched by sequence id -------------------------------------------------


def test_a_plain_log_is_matched_by_sequence_id_and_checks_each_call() -> None:
    replay = Replay("run", [{"k": R.START}, rec(R.CALL, 0, v=1), rec(R.CALL, 1, v=2)], print)
    step = replay.begin("save", None, None, "wf.py:9")
    assert (step.seq, step.done) == (0, True)
    with pytest.raises(NonDeterminismError, match=r"sleep\(\) at wf.py:9.*save\(\)"):
        replay.begin("sleep", None, None, "wf.py:9")


def test_a_call_with_no_record_while_later_ones_exist_is_a_divergence() -> None:
    replay = Replay("run", [{"k": R.START}, rec(R.CALL, 0, v=1), rec(R.CALL, 2, v=3)], print)
    replay.begin("save", None, None, "wf.py:1")
    with pytest.raises(NonDeterminismError, match="no record"):
        replay.begin("save", None, None, "wf.py:2")


def test_returning_before_the_recorded_calls_is_a_divergence() -> None:
    replay = Replay("run", [{"k": R.START}, rec(R.CALL, 0, v=1), rec(R.CALL, 1, v=2)], print)
    replay.begin("save", None, None, "wf.py:1")
    with pytest.raises(NonDeterminismError, match="return"):
        replay.check_complete()
