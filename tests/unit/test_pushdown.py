"""What search pushes down to the store is never stricter than the filter."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from substantial import RunStatus, RunSummary
from substantial._pushdown import Narrowing, narrowing
from substantial.backends._rules import state_may_equal
from substantial.filters import compile_filter

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# A store keeps times as float seconds; a summary shows them as datetimes.
Stored = dict[str, tuple[float | None, float | None]]


def admits(n: Narrowing, run: RunSummary, stored: Stored) -> bool:
    """Whether a store applying ``n`` to its own floats would return ``run``."""

    def within(ts: float | None, lo: float | None, hi: float | None) -> bool:
        if lo is None and hi is None:
            return True
        if ts is None:
            return False
        return (lo is None or ts >= lo) and (hi is None or ts <= hi)

    started, ended = stored[run.run_id]
    return (
        (n.statuses is None or run.status in n.statuses)
        and (n.run_ids is None or run.run_id in n.run_ids)
        and within(started, n.started_after, n.started_before)
        and within(ended, n.ended_after, n.ended_before)
        and all(state_may_equal(run.state, k, v) for k, v in n.state_equals)
    )


def a_run(rng: random.Random, i: int, stored: Stored) -> RunSummary:
    started = T0.timestamp() + rng.uniform(0, 100) if rng.random() < 0.9 else None
    ended = started + rng.uniform(0, 5) if started is not None and rng.random() < 0.6 else None
    stored[f"r{i}"] = (started, ended)

    def dt(t: float | None) -> datetime | None:
        return None if t is None else datetime.fromtimestamp(t, UTC)

    return RunSummary(
        run_id=f"r{i}",
        workflow="w",
        status=rng.choice(list(RunStatus)),
        started_at=dt(started),
        ended_at=dt(ended),
        result=rng.choice([None, 1, "x", [1, 2]]),
        state={} if rng.random() < 0.2 else {"customer": rng.choice(STATE_VALUES)},
    )


STATE_VALUES: list[Any] = ["acme", "globex", 1, 1.0, 2, True, False, None, [1], {"a": 1}]


def a_filter(rng: random.Random, runs: list[RunSummary], depth: int = 0) -> dict[str, Any]:
    kinds = ["status", "run_id", "time", "value", "state"]
    kind = rng.choice(kinds + (["and", "or", "not"] * (depth < 2)))
    if kind in ("and", "or"):
        return {kind: [a_filter(rng, runs, depth + 1) for _ in range(rng.randrange(0, 3))]}
    if kind == "not":
        return {"not": a_filter(rng, runs, depth + 1)}
    if kind == "status":
        if rng.random() < 0.5:
            return {"status": {"eq": rng.choice(list(RunStatus)).value}}
        return {"status": {"in": [s.value for s in rng.sample(list(RunStatus), 3)]}}
    if kind == "run_id":
        ids = [r.run_id for r in rng.sample(runs, 3)]
        return {"run_id": {"eq": ids[0]}} if rng.random() < 0.5 else {"run_id": {"in": ids}}
    if kind == "time":
        field = rng.choice(["started_at", "ended_at"])
        times = [getattr(r, field) for r in runs]
        pick = rng.choice(times)  # often exactly a run's own time: the rounding edge
        op = rng.choice(["eq", "lt", "lte", "gt", "gte", "in"])
        if op == "in":
            return {field: {"in": [pick, rng.choice(times)]}}
        value: Any = pick.isoformat() if pick is not None and rng.random() < 0.3 else pick
        return {field: {op: value}}
    if kind == "state":
        op = rng.choice(["eq", "eq", "in", "contains", "gt"])
        value = rng.choice(STATE_VALUES) if op != "in" else rng.sample(STATE_VALUES, 2)
        return {"state": {rng.choice(["customer", "other"]): {op: value}}}
    return {"eq": rng.choice([None, 1, "x"])}


def test_the_narrowing_admits_every_run_the_filter_matches() -> None:
    rng = random.Random(7)
    checked = 0
    for _ in range(3000):
        stored: Stored = {}
        runs = [a_run(rng, i, stored) for i in range(8)]
        expr = a_filter(rng, runs)
        pred, n = compile_filter(expr), narrowing(expr)
        for run in runs:
            if pred(run):
                checked += 1
                assert admits(n, run, stored), (expr, run, n)
    assert checked > 2000  # the generator produced matching runs to check


def test_terms_under_and_are_pushed_down_together() -> None:
    n = narrowing(
        {
            "and": [
                {"status": {"in": ["FAILED", "CANCELLED"]}},
                {"run_id": {"in": ["a", "b"]}},
                {"started_at": {"gte": "2026-01-01T00:00:00Z"}},
                {"started_at": {"lt": T0 + timedelta(days=1)}},
                {"ended_at": {"eq": T0}},
            ]
        }
    )
    assert n.statuses == frozenset({RunStatus.FAILED, RunStatus.CANCELLED})
    assert n.run_ids == frozenset({"a", "b"})
    assert n.started_after is not None and abs(n.started_after - T0.timestamp()) < 0.01
    assert n.started_before is not None and n.started_before >= (T0 + timedelta(days=1)).timestamp()
    assert n.ended_after is not None and n.ended_before is not None


def test_a_published_key_equal_to_a_scalar_is_pushed_down() -> None:
    n = narrowing(
        {
            "and": [
                {"state": {"customer": {"eq": "acme"}}},
                {"state": {"tier": {"eq": 2}}},
                {"state": {"anything": {"eq": None}}},  # also runs that never published it
                {"state": {"tags": {"eq": ["a"]}}},  # deep equality: left to the filter
                {"state": {"name": {"contains": "ac"}}},
            ]
        }
    )
    assert n.state_equals == (("customer", "acme"), ("tier", 2))
    assert narrowing({"or": [{"state": {"customer": {"eq": "acme"}}}]}) == Narrowing()


def test_or_and_not_push_nothing_down() -> None:
    assert narrowing({"or": [{"status": {"eq": "FAILED"}}]}) == Narrowing()
    assert narrowing({"not": {"run_id": {"eq": "a"}}}) == Narrowing()


def test_contradictions_match_nothing() -> None:
    n = narrowing({"and": [{"run_id": {"eq": "a"}}, {"run_id": {"eq": "b"}}]})
    assert n.matches_nothing
