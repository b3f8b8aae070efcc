"""Spec of the search-filter language (substantial.filters)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from substantial._types import RunStatus, RunSummary
from substantial.errors import FilterError
from substantial.filters import compile_filter, matches, parse_filter_json, required_statuses

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def run(
    result: Any = None,
    *,
    status: RunStatus = RunStatus.COMPLETED,
    error: str | None = None,
    run_id: str = "run-1",
    started_at: datetime | None = T0,
    ended_at: datetime | None = T0 + timedelta(minutes=5),
) -> RunSummary:
    return RunSummary(
        run_id=run_id,
        workflow="wf",
        status=status,
        started_at=started_at,
        ended_at=ended_at,
        result=result,
        error=error,
    )


def failed(error: str) -> RunSummary:
    return run(status=RunStatus.FAILED, error=error, result="ignored")


def path_of(expr: Any) -> str:
    with pytest.raises(FilterError) as info:
        compile_filter(expr)
    return info.value.path


# --- no filter ----------------------------------------------------------------------------


def test_none_matches_every_run() -> None:
    assert compile_filter(None)(run())
    assert matches(None, failed("x"))


# --- bare terms test the run's value ------------------------------------------------------


class TestEq:
    def test_numbers_int_and_float_are_equal(self) -> None:
        assert matches({"eq": 1}, run(1.0))
        assert matches({"eq": 2.5}, run(2.5))
        assert not matches({"eq": 1}, run(2))

    def test_bool_is_not_a_number(self) -> None:
        assert not matches({"eq": True}, run(1))
        assert not matches({"eq": 0}, run(False))
        assert matches({"eq": True}, run(True))

    def test_strings(self) -> None:
        assert matches({"eq": "ok"}, run("ok"))
        assert not matches({"eq": "ok"}, run("OK"))

    def test_incompatible_types_are_simply_unequal(self) -> None:
        assert not matches({"eq": "1"}, run(1))
        assert not matches({"eq": [1]}, run(1))

    def test_lists_and_objects_compare_deeply(self) -> None:
        assert matches({"eq": [1, "a", {"k": None}]}, run([1.0, "a", {"k": None}]))
        assert not matches({"eq": [1, 2]}, run([1, 2, 3]))
        assert not matches({"eq": [True]}, run([1]))
        assert matches({"eq": {"a": 1, "b": [2]}}, run({"b": [2], "a": 1}))
        assert not matches({"eq": {"a": 1}}, run({"a": 1, "b": 2}))

    def test_none(self) -> None:
        assert matches({"eq": None}, run(None))
        assert not matches({"eq": None}, run(0))
        assert not matches({"eq": 0}, run(None))


class TestOrdering:
    @pytest.mark.parametrize(
        ("op", "value", "expected"),
        [
            ("lt", 10, False),
            ("lt", 11, True),
            ("lte", 10, True),
            ("lte", 9.5, False),
            ("gt", 9, True),
            ("gt", 10, False),
            ("gte", 10.0, True),
            ("gte", 11, False),
        ],
    )
    def test_numbers(self, op: str, value: float, expected: bool) -> None:
        assert matches({op: value}, run(10)) is expected

    def test_strings_order_lexicographically(self) -> None:
        assert matches({"lt": "b"}, run("abc"))
        assert matches({"gte": "abc"}, run("abc"))
        assert not matches({"gt": "b"}, run("abc"))

    def test_incompatible_types_are_false_not_errors(self) -> None:
        for op in ("lt", "lte", "gt", "gte"):
            assert not matches({op: 5}, run("5"))
            assert not matches({op: "5"}, run(5))
            assert not matches({op: [1]}, run([1]))

    def test_none_never_orders(self) -> None:
        for op in ("lt", "lte", "gt", "gte"):
            assert not matches({op: None}, run(None))
            assert not matches({op: 1}, run(None))
            assert not matches({op: None}, run(1))

    def test_bools_are_not_numbers_for_ordering(self) -> None:
        assert not matches({"lt": 2}, run(True))
        assert not matches({"gte": False}, run(0))
        assert not matches({"gte": True}, run(True))


class TestContains:
    def test_list_holding_the_value(self) -> None:
        assert matches({"contains": 2}, run([1, 2, 3]))
        assert matches({"contains": {"id": 1}}, run([{"id": 1}]))
        assert not matches({"contains": 4}, run([1, 2, 3]))
        assert not matches({"contains": True}, run([1]))

    def test_substring_of_a_string(self) -> None:
        assert matches({"contains": "ell"}, run("hello"))
        assert not matches({"contains": "xyz"}, run("hello"))
        assert not matches({"contains": 1}, run("a1"))

    def test_object_having_the_key(self) -> None:
        assert matches({"contains": "a"}, run({"a": 1}))
        assert not matches({"contains": 1}, run({"a": 1}))

    def test_other_subjects_contain_nothing(self) -> None:
        assert not matches({"contains": 1}, run(1))
        assert not matches({"contains": None}, run(None))


class TestIn:
    def test_element_of_a_list(self) -> None:
        assert matches({"in": [1, 2, 3]}, run(2.0))
        assert matches({"in": ["a", None]}, run(None))
        assert not matches({"in": [1, 2]}, run(3))
        assert not matches({"in": [1]}, run(True))

    def test_substring_of_a_string(self) -> None:
        assert matches({"in": "hello world"}, run("lo wo"))
        assert not matches({"in": "hello"}, run("bye"))
        assert not matches({"in": "123"}, run(1))


def test_a_failed_runs_value_is_its_error_message() -> None:
    assert matches({"contains": "timeout"}, failed("connection timeout after 5s"))
    assert matches({"eq": "boom"}, failed("boom"))
    assert not matches({"eq": "ignored"}, failed("boom"))


@pytest.mark.parametrize(
    "status", [RunStatus.RUNNING, RunStatus.SUSPENDED, RunStatus.CANCELLED, RunStatus.PENDING]
)
def test_other_runs_have_no_value(status: RunStatus) -> None:
    r = run("result", status=status, error="err")
    assert matches({"eq": None}, r)
    assert not matches({"eq": "result"}, r)
    assert not matches({"eq": "err"}, r)


# --- special terms ------------------------------------------------------------------------


class TestStatus:
    def test_eq_with_string_or_member(self) -> None:
        assert matches({"status": {"eq": "COMPLETED"}}, run())
        assert matches({"status": {"eq": RunStatus.FAILED}}, failed("x"))
        assert not matches({"status": {"eq": "completed"}}, run())

    def test_in_list(self) -> None:
        expr = {"status": {"in": ["FAILED", RunStatus.CANCELLED]}}
        assert matches(expr, failed("x"))
        assert matches(expr, run(status=RunStatus.CANCELLED))
        assert not matches(expr, run())

    def test_contains_is_substring(self) -> None:
        expr = {"status": {"contains": "ED"}}
        for status in ("COMPLETED", "FAILED", "CANCELLED", "SUSPENDED"):
            assert matches(expr, run(status=RunStatus(status)))
        assert not matches(expr, run(status=RunStatus.RUNNING))

    def test_ordering_on_the_string(self) -> None:
        assert matches({"status": {"lt": "D"}}, run())  # "COMPLETED" < "D"


def test_run_id_term() -> None:
    r = run(run_id="order-42")
    assert matches({"run_id": {"eq": "order-42"}}, r)
    assert matches({"run_id": {"contains": "der-"}}, r)
    assert matches({"run_id": {"in": ["a", "order-42"]}}, r)
    assert matches({"run_id": {"gt": "order-1"}}, r)
    assert not matches({"run_id": {"eq": "order-4"}}, r)


class TestTimestamps:
    def test_aware_datetimes(self) -> None:
        assert matches({"started_at": {"eq": T0}}, run())
        assert matches({"started_at": {"lt": T0 + timedelta(seconds=1)}}, run())
        assert matches({"started_at": {"lte": T0}}, run())
        assert not matches({"started_at": {"gt": T0}}, run())
        assert matches({"ended_at": {"gte": T0 + timedelta(minutes=5)}}, run())

    def test_other_timezones_are_compared_as_instants(self) -> None:
        paris = timezone(timedelta(hours=2))
        assert matches({"started_at": {"eq": datetime(2024, 5, 1, 14, 0, tzinfo=paris)}}, run())

    def test_naive_datetimes_are_utc(self) -> None:
        assert matches({"started_at": {"eq": datetime(2024, 5, 1, 12, 0)}}, run())
        assert matches({"started_at": {"gt": datetime(2024, 5, 1, 11, 59)}}, run())

    def test_iso_strings_with_z_offset_or_none(self) -> None:
        assert matches({"started_at": {"eq": "2024-05-01T12:00:00Z"}}, run())
        assert matches({"started_at": {"eq": "2024-05-01T14:00:00+02:00"}}, run())
        assert matches({"started_at": {"eq": "2024-05-01T12:00:00"}}, run())
        assert matches({"started_at": {"gte": "2024-05-01"}}, run())
        assert matches({"ended_at": {"lt": "2024-05-01T12:05:00.000001Z"}}, run())
        assert not matches({"ended_at": {"lt": "2024-05-01T12:05:00Z"}}, run())

    def test_in_a_list_of_instants(self) -> None:
        expr = {"started_at": {"in": ["2020-01-01T00:00:00Z", T0]}}
        assert matches(expr, run())
        assert not matches(expr, run(started_at=T0 + timedelta(seconds=1)))

    def test_missing_timestamps_match_only_eq_none(self) -> None:
        pending = run(status=RunStatus.RUNNING, ended_at=None)
        assert matches({"ended_at": {"eq": None}}, pending)
        assert matches({"ended_at": {"in": [None]}}, pending)
        assert not matches({"ended_at": {"eq": None}}, run())
        for op in ("lt", "lte", "gt", "gte"):
            assert not matches({"ended_at": {op: "2100-01-01T00:00:00Z"}}, pending)
            assert not matches({"ended_at": {op: "1900-01-01T00:00:00Z"}}, pending)
            assert not matches({"ended_at": {op: None}}, pending)


# --- logical operators --------------------------------------------------------------------


def test_not() -> None:
    assert matches({"not": {"eq": 1}}, run(2))
    assert not matches({"not": {"eq": 1}}, run(1))
    assert matches({"not": {"not": {"eq": 1}}}, run(1))


def test_and_or() -> None:
    ok, bad = run(5), failed("boom")
    both = {"and": [{"status": {"eq": "COMPLETED"}}, {"gt": 3}]}
    either = {"or": [{"eq": "boom"}, {"gt": 3}]}
    assert matches(both, ok)
    assert not matches(both, bad)
    assert matches(either, ok)
    assert matches(either, bad)
    assert not matches(either, run(1))


def test_empty_and_is_true_empty_or_is_false() -> None:
    assert matches({"and": []}, run())
    assert not matches({"or": []}, run())


def test_deep_nesting() -> None:
    expr = {
        "or": [
            {"and": [{"status": {"eq": "FAILED"}}, {"not": {"contains": "retry"}}]},
            {"and": [{"run_id": {"contains": "vip"}}, {"not": {"ended_at": {"eq": None}}}]},
        ]
    }
    assert matches(expr, failed("fatal"))
    assert not matches(expr, failed("will retry"))
    assert matches(expr, run(run_id="vip-1"))
    assert not matches(expr, run(run_id="vip-1", ended_at=None))
    assert not matches(expr, run(run_id="std-1"))


def test_compiled_predicate_is_reusable() -> None:
    pred = compile_filter({"gt": 1})
    assert [pred(run(v)) for v in (0, 1, 2, 3)] == [False, False, True, True]


# --- malformed filters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "path"),
    [
        ({}, ""),
        ({"eq": 1, "lt": 2}, ""),
        ({"equals": 1}, ""),
        ("eq", ""),
        ([{"eq": 1}], ""),
        ({"not": {}}, "not"),
        ({"not": 1}, "not"),
        ({"not": {"bogus": 1}}, "not"),
        ({"and": {"eq": 1}}, "and"),
        ({"or": "x"}, "or"),
        ({"and": [{"eq": 1}, {}]}, "and[1]"),
        ({"and": [{"eq": 1}, 7]}, "and[1]"),
        ({"or": [{"eq": 1}, {"and": [{"nope": 1}]}]}, "or[1].and[0]"),
        ({"and": [{"eq": 1}, {"not": {"status": {"and": []}}}]}, "and[1].not.status"),
        ({"status": {"run_id": {"eq": "x"}}}, "status"),
        ({"status": "COMPLETED"}, "status"),
        ({"status": {}}, "status"),
        ({"run_id": {"eq": "a", "in": ["a"]}}, "run_id"),
        ({"started_at": {"not": {"eq": None}}}, "started_at"),
        ({"ended_at": {"contains": "2024"}}, "ended_at"),
        ({"in": 5}, "in"),
        ({"not": {"status": {"in": None}}}, "not.status.in"),
        ({"started_at": {"lt": "yesterday"}}, "started_at.lt"),
        ({"started_at": {"eq": ""}}, "started_at.eq"),
        ({"and": [{"ended_at": {"gte": 1700000000}}]}, "and[0].ended_at.gte"),
        ({"started_at": {"in": "2024-01-01"}}, "started_at.in"),
        ({"started_at": {"in": [T0, "2024-13-01"]}}, "started_at.in[1]"),
    ],
)
def test_malformed_filters_name_the_path(expr: Any, path: str) -> None:
    assert path_of(expr) == path


def test_error_message_says_what_and_lists_allowed_keys() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter({"and": [{"status": {"and": []}}]})
    err = info.value
    assert err.path == "and[0].status"
    assert "'and' is not allowed in a 'status' term" in err.problem
    assert "eq, lt, lte, gt, gte, in, contains" in err.problem
    assert "and[0].status" in str(err)


def test_unknown_top_level_key_lists_every_expression_key() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter({"equals": 1})
    for key in ("and", "or", "not", "eq", "contains", "run_id", "started_at", "status"):
        assert key in info.value.problem


def test_two_keys_are_reported() -> None:
    with pytest.raises(FilterError, match=r"exactly one key.*'eq', 'lt'"):
        compile_filter({"eq": 1, "lt": 2})


def test_malformed_date_names_the_value() -> None:
    with pytest.raises(FilterError, match="not an ISO-8601 date/time: 'yesterday'"):
        compile_filter({"started_at": {"lt": "yesterday"}})


def test_validation_happens_up_front_even_in_unreached_branches() -> None:
    with pytest.raises(FilterError):
        compile_filter({"or": [{"and": []}, {"bogus": 1}]})


# --- JSON text ----------------------------------------------------------------------------


def test_parse_filter_json_round_trip() -> None:
    expr = parse_filter_json('{"and": [{"status": {"eq": "FAILED"}}, {"contains": "boom"}]}')
    assert matches(expr, failed("boom!"))
    assert parse_filter_json('{"started_at": {"gt": "2024-01-01T00:00:00Z"}}') == {
        "started_at": {"gt": "2024-01-01T00:00:00Z"}
    }


@pytest.mark.parametrize("text", ["{", "", "not json", "[1, 2]", "null", '"eq"', "3"])
def test_parse_filter_json_rejects_bad_json_and_non_objects(text: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_filter_json(text)
    assert info.value.path == ""


def test_parse_filter_json_validates_the_expression() -> None:
    with pytest.raises(FilterError) as info:
        parse_filter_json('{"not": {"status": {"lt": 1, "gt": 2}}}')
    assert info.value.path == "not.status"


# -- what a store can filter by itself --------------------------------------------

S = RunStatus


@pytest.mark.parametrize(
    ("expr", "statuses"),
    [
        (None, None),
        ({"eq": 1}, None),
        ({"status": {"eq": "FAILED"}}, {S.FAILED}),
        ({"status": {"eq": S.CANCELLED}}, {S.CANCELLED}),
        ({"status": {"in": ["COMPLETED", "FAILED", "nope"]}}, {S.COMPLETED, S.FAILED}),
        ({"status": {"in": "COMPLETED"}}, None),  # substring test: not a set of statuses
        ({"status": {"eq": "completed"}}, set()),  # statuses are upper case: nothing matches
        ({"status": {"contains": "ED"}}, None),
        ({"not": {"status": {"eq": "FAILED"}}}, None),
        ({"or": [{"status": {"eq": "FAILED"}}, {"eq": 1}]}, None),
        (
            {"and": [{"status": {"in": ["COMPLETED", "FAILED"]}}, {"status": {"eq": "FAILED"}}]},
            {S.FAILED},
        ),
        ({"and": [{"gt": 2}, {"status": {"eq": "COMPLETED"}}]}, {S.COMPLETED}),
        ({"and": []}, None),
    ],
)
def test_required_statuses_are_read_from_status_terms(
    expr: dict[str, Any] | None, statuses: set[RunStatus] | None
) -> None:
    got = required_statuses(expr)
    assert (None if got is None else set(got)) == statuses
    if got is not None:  # never stricter than the predicate itself
        pred = compile_filter(expr)
        for st in RunStatus:
            if pred(run(5, status=st)):
                assert st in got
