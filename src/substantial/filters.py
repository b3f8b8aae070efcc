"""Search filters over run summaries.

A filter is a small JSON-shaped expression (the grammar of the Metatype Substantial
runtime, except that values are plain JSON/Python values rather than JSON-encoded
strings)::

    term         ::= {"eq": v} | {"lt": v} | {"lte": v} | {"gt": v} | {"gte": v}
                   | {"in": v} | {"contains": v}
    special_term ::= {"run_id": term} | {"started_at": term} | {"ended_at": term}
                   | {"status": term} | {"state": {key: term}}
    expr         ::= {"not": expr} | {"or": [expr, ...]} | {"and": [expr, ...]}
                   | term | special_term

Every object has exactly one key.

*Subjects.* A bare term tests the run's *value*: its result if it COMPLETED, its
error message if it FAILED, otherwise ``None``. A special term tests a field
instead: ``run_id`` and ``status`` as strings (``RunStatus`` members are accepted as
values), ``started_at``/``ended_at`` as timestamps, ``state`` the latest value the
run published under ``key`` (``c.publish``; ``None`` if it published none).

*Operators.* ``eq`` is JSON equality (``1 == 1.0``, but ``true`` is not ``1``).
``lt``/``lte``/``gt``/``gte`` order numbers with numbers, strings with strings and
timestamps with timestamps; any other pairing (``None`` included) is simply false.
``contains`` is true if the subject is a list holding ``v``, a string containing
``v`` as a substring, or an object with key ``v``. ``in`` is true if the subject is
an element of ``v`` (a list) or a substring of ``v`` (a string).
``{"and": []}`` is true and ``{"or": []}`` is false.

*Timestamps.* ``started_at``/``ended_at`` accept ``eq``, ``lt``, ``lte``, ``gt``,
``gte`` and ``in`` (a list); values are datetimes (naive ones are taken as UTC),
ISO-8601 strings (a trailing ``Z`` is fine) or ``None``. A run that has not
started/ended matches only ``{"eq": None}`` (or an ``in`` list holding ``None``).

Filters are validated completely by :func:`compile_filter`; a malformed one raises
:class:`~substantial.errors.FilterError` whose ``path`` says where, e.g.
``and[1].not.status``. Example -- failed or cancelled runs started in 2024 whose
value mentions "timeout"::

    {"and": [
        {"status": {"in": ["FAILED", "CANCELLED"]}},
        {"started_at": {"gte": "2024-01-01T00:00:00Z"}},
        {"not": {"started_at": {"gte": "2025-01-01T00:00:00Z"}}},
        {"contains": "timeout"},
    ]}
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from ._types import RunStatus, RunSummary
from .errors import FilterError

__all__ = ["Predicate", "compile_filter", "matches", "parse_filter_json", "uses_state"]

Predicate = Callable[[RunSummary], bool]
_Test = Callable[[Any], bool]

_TERM_OPS = ("eq", "lt", "lte", "gt", "gte", "in", "contains")
_DATE_OPS = ("eq", "lt", "lte", "gt", "gte", "in")
_SPECIAL = ("run_id", "started_at", "ended_at", "status", "state")
_LOGICAL = ("and", "or", "not")
_EXPR_KEYS = _LOGICAL + _TERM_OPS + _SPECIAL
_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}


def compile_filter(expr: Mapping[str, Any] | None) -> Predicate:
    """Validate ``expr`` completely, then return a predicate over run summaries.

    ``None`` means "no filter" and matches every run. Raises ``FilterError``.
    """
    if expr is None:
        return lambda _run: True
    return _compile_expr(expr, "")


def required_statuses(expr: Mapping[str, Any] | None) -> frozenset[RunStatus] | None:
    """The statuses every run matching ``expr`` must have, or None if unconstrained.

    Read from ``status`` terms with ``eq`` or a list ``in``, at the top level or
    under ``and``, so a store can filter by status before the full predicate
    runs. ``expr`` must already be valid (see :func:`compile_filter`)."""
    if not isinstance(expr, Mapping) or len(expr) != 1:
        return None
    [(key, value)] = expr.items()
    if key == "and" and isinstance(value, list | tuple):
        found = [r for r in map(required_statuses, value) if r is not None]
        return frozenset.intersection(*found) if found else None
    if key != "status" or not isinstance(value, Mapping) or len(value) != 1:
        return None
    [(op, v)] = value.items()
    wanted = [v] if op == "eq" else v if op == "in" and isinstance(v, list | tuple) else None
    if wanted is None:
        return None
    known = {st.value: st for st in RunStatus}
    names = [w.value if isinstance(w, RunStatus) else w for w in wanted]
    return frozenset(known[n] for n in names if isinstance(n, str) and n in known)


def parse_datetime(value: Any, path: str = "") -> datetime | None:
    """A filter's time value as an aware UTC datetime (naive ones are UTC)."""
    return _parse_dt(value, path)


def matches(expr: Mapping[str, Any] | None, run: RunSummary) -> bool:
    """Whether ``run`` satisfies ``expr`` (compiles it each call)."""
    return compile_filter(expr)(run)


def parse_filter_json(text: str) -> Mapping[str, Any]:
    """Decode a filter from JSON text (CLI, HTTP) and validate it."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise FilterError("", f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FilterError("", f"expected a JSON object, got {_kind(value)}")
    compile_filter(value)
    return value


# --- compilation ------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _single(node: Any, path: str, allowed: tuple[str, ...], what: str) -> tuple[str, Any]:
    """The only (key, value) of ``node``, checking it is an object with one allowed key."""
    keys = ", ".join(allowed)
    if not isinstance(node, Mapping):
        problem = f"expected {what} (an object with one of: {keys}), got {_kind(node)}"
        raise FilterError(path, problem)
    if len(node) != 1:
        found = ", ".join(repr(k) for k in node) or "none"
        problem = f"expected exactly one key in {what}, got {len(node)} ({found})"
        raise FilterError(path, f"{problem}; allowed keys: {keys}")
    ((key, value),) = node.items()
    if key not in allowed:
        raise FilterError(path, f"{key!r} is not allowed in {what}; allowed keys: {keys}")
    return key, value


def _compile_expr(node: Any, path: str) -> Predicate:
    key, value = _single(node, path, _EXPR_KEYS, "a filter expression")
    here = _join(path, key)
    if key == "not":
        inner = _compile_expr(value, here)
        return lambda run: not inner(run)
    if key in ("and", "or"):
        if not isinstance(value, list | tuple):
            raise FilterError(here, f"{key!r} takes a list of expressions, got {_kind(value)}")
        parts = [_compile_expr(item, f"{here}[{i}]") for i, item in enumerate(value)]
        if key == "and":
            return lambda run: all(p(run) for p in parts)
        return lambda run: any(p(run) for p in parts)
    if key in _SPECIAL:
        return _compile_special(key, value, here)
    test = _compile_op(key, value, here)
    return lambda run: test(_run_value(run))


def uses_state(expr: Mapping[str, Any] | None) -> bool:
    """Whether a (valid) filter has a ``state`` term: a search must then read what
    each candidate run published."""
    if not isinstance(expr, Mapping):
        return False
    for key, value in expr.items():
        if key == "state":
            return True
        if key == "not" and uses_state(value):
            return True
        if key in ("and", "or") and any(uses_state(v) for v in value):
            return True
    return False


def _compile_state(node: Any, path: str) -> Predicate:
    if not isinstance(node, Mapping) or len(node) != 1:
        got = _kind(node) if not isinstance(node, Mapping) else f"{len(node)} keys"
        raise FilterError(path, f"'state' takes an object with one published key, got {got}")
    [(key, term)] = node.items()
    if not isinstance(key, str) or not key:
        raise FilterError(path, f"a published key is a non-empty string, got {key!r}")
    here = _join(path, key)
    op, value = _single(term, here, _TERM_OPS, f"a term on state {key!r}")
    test = _compile_op(op, value, _join(here, op))
    return lambda run: test(run.state.get(key))


def _compile_special(field: str, node: Any, path: str) -> Predicate:
    if field == "state":
        return _compile_state(node, path)
    what = f"a {field!r} term"
    if field in ("started_at", "ended_at"):
        op, value = _single(node, path, _DATE_OPS, what)
        here = _join(path, op)
        if op == "in":
            if not isinstance(value, list | tuple):
                raise FilterError(here, f"'in' on {field} takes a list, got {_kind(value)}")
            value = [_parse_dt(item, f"{here}[{i}]") for i, item in enumerate(value)]
        else:
            value = _parse_dt(value, here)
        test = _compile_op(op, value, here)
        if field == "started_at":
            return lambda run: test(_utc(run.started_at))
        return lambda run: test(_utc(run.ended_at))
    op, value = _single(node, path, _TERM_OPS, what)
    test = _compile_op(op, value, _join(path, op))
    if field == "status":
        return lambda run: test(str(run.status))
    return lambda run: test(run.run_id)


def _compile_op(op: str, v: Any, path: str) -> _Test:
    if isinstance(v, RunStatus):
        v = v.value
    if op == "eq":
        return lambda s: _eq(s, v)
    if op == "contains":
        return lambda s: _contains(s, v)
    if op == "in":
        if isinstance(v, str):
            return lambda s: isinstance(s, str) and s in v
        if isinstance(v, list | tuple):
            items = [x.value if isinstance(x, RunStatus) else x for x in v]
            return lambda s: any(_eq(s, x) for x in items)
        raise FilterError(path, f"'in' takes a list or a string, got {_kind(v)}")
    cmp = _ORDER[op]
    return lambda s: _ordered(s, v) and cmp(s, v)


def _parse_dt(value: Any, path: str) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return _utc(value)
    if not isinstance(value, str):
        raise FilterError(path, f"expected a datetime or an ISO-8601 string, got {_kind(value)}")
    text = value.strip()
    if text[-1:] in ("z", "Z"):
        text = text[:-1] + "+00:00"
    try:
        return _utc(datetime.fromisoformat(text))
    except ValueError:
        raise FilterError(path, f"not an ISO-8601 date/time: {value!r}") from None


# --- evaluation -------------------------------------------------------------------------


def _run_value(run: RunSummary) -> Any:
    if run.status == RunStatus.COMPLETED:
        return run.result
    if run.status == RunStatus.FAILED:
        return run.error
    return None


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _eq(a: Any, b: Any) -> bool:
    """JSON equality: no bool/number confusion, lists and objects compared deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_num(a) and _is_num(b):
        return bool(a == b)
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, datetime) and isinstance(b, datetime):
        return a == b
    return a is None and b is None


def _ordered(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` may be ordered (same kind: numbers, strings or datetimes)."""
    return (
        (_is_num(a) and _is_num(b))
        or (isinstance(a, str) and isinstance(b, str))
        or (isinstance(a, datetime) and isinstance(b, datetime))
    )


def _contains(subject: Any, v: Any) -> bool:
    if isinstance(subject, str):
        return isinstance(v, str) and v in subject
    if isinstance(subject, list | tuple):
        return any(_eq(x, v) for x in subject)
    if isinstance(subject, Mapping):
        return isinstance(v, str) and v in subject
    return False
