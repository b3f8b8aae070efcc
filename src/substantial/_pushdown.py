"""What of a search filter a store can apply itself.

``search`` compiles the whole filter into a predicate, which alone decides
what matches. To avoid loading every run, it first asks the store only for
runs that *must* be considered: :func:`narrowing` reads the constraints that
every matching run satisfies (status, run id and time terms at the top level
or under ``and``, and a published state key equal to a scalar) into the fields
of a :class:`~substantial.backends.RunQuery`.
The rule that keeps this correct: the pushed-down set is never stricter than
the filter. So ``or`` and ``not`` push nothing down, a ``gt`` pushes an
inclusive bound, and time bounds are widened by a millisecond so rounding
between a stored float and a datetime can never exclude a run.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from typing import Any

import orjson

from ._types import RunStatus, RunSummary
from .errors import ClientError
from .filters import parse_datetime, required_statuses

_SLACK = 0.001  # seconds: stored floats and filter datetimes round differently


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Narrowing:
    """Constraints every run matching a filter satisfies (None = unconstrained)."""

    statuses: frozenset[RunStatus] | None = None
    run_ids: frozenset[str] | None = None
    started_after: float | None = None
    started_before: float | None = None
    ended_after: float | None = None
    ended_before: float | None = None
    state_equals: tuple[tuple[str, Any], ...] = ()  # published key == a scalar

    @property
    def matches_nothing(self) -> bool:
        return (self.statuses is not None and not self.statuses) or (
            self.run_ids is not None and not self.run_ids
        )

    def query_fields(self) -> dict[str, Any]:
        """The fields to set on a RunQuery."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def narrowing(expr: Mapping[str, Any] | None) -> Narrowing:
    """The constraints of ``expr`` (already validated by ``compile_filter``)."""
    if not isinstance(expr, Mapping) or len(expr) != 1:
        return Narrowing()
    [(key, value)] = expr.items()
    if key == "and" and isinstance(value, list | tuple):
        out = Narrowing()
        for part in value:
            out = _both(out, narrowing(part))
        return out
    if key == "status":
        return Narrowing(statuses=required_statuses(expr))
    if key == "state":
        return Narrowing(state_equals=_state_equals(value))
    if not isinstance(value, Mapping) or len(value) != 1:
        return Narrowing()
    [(op, v)] = value.items()
    if key == "run_id":
        return Narrowing(run_ids=_ids(op, v))
    if key in ("started_at", "ended_at"):
        lo, hi = _bounds(op, v)
        if key == "started_at":
            return Narrowing(started_after=lo, started_before=hi)
        return Narrowing(ended_after=lo, ended_before=hi)
    return Narrowing()


def _ids(op: str, v: Any) -> frozenset[str] | None:
    if op == "eq":
        return frozenset([v]) if isinstance(v, str) else frozenset()
    if op == "in" and isinstance(v, list | tuple):  # a string is a substring test: no
        return frozenset(x for x in v if isinstance(x, str))
    return None


def _state_equals(value: Any) -> tuple[tuple[str, Any], ...]:
    """``{key: {"eq": v}}`` with ``v`` a string, number or bool: runs that published
    ``v`` under ``key``. (``eq None`` also matches runs that never published the
    key, and lists and objects compare deeply: those push nothing down.)"""
    if not isinstance(value, Mapping) or len(value) != 1:
        return ()
    [(key, term)] = value.items()
    if not isinstance(term, Mapping) or len(term) != 1:
        return ()
    [(op, v)] = term.items()
    if op == "eq" and isinstance(v, str | int | float) and (v == v):  # (not NaN)
        return ((key, v),)
    return ()


def _bounds(op: str, v: Any) -> tuple[float | None, float | None]:
    """Inclusive (lo, hi) bounds on a timestamp implied by one time term."""
    if op == "in" and isinstance(v, list | tuple):
        times = [parse_datetime(x) for x in v]
        if not times or any(x is None for x in times):
            return None, None  # None in the list: runs without that time match too
        stamps = [x.timestamp() for x in times if x is not None]
        return min(stamps) - _SLACK, max(stamps) + _SLACK
    when = parse_datetime(v)
    if when is None:
        return None, None  # {"eq": None}: only runs without the time; nothing to push
    t = when.timestamp()
    if op == "eq":
        return t - _SLACK, t + _SLACK
    if op in ("gt", "gte"):
        return t - _SLACK, None
    if op in ("lt", "lte"):
        return None, t + _SLACK
    return None, None


def _both(a: Narrowing, b: Narrowing) -> Narrowing:
    """Constraints of ``x and y``: each holds."""
    return Narrowing(
        statuses=_meet(a.statuses, b.statuses),
        run_ids=_meet(a.run_ids, b.run_ids),
        started_after=_max(a.started_after, b.started_after),
        started_before=_min(a.started_before, b.started_before),
        ended_after=_max(a.ended_after, b.ended_after),
        ended_before=_min(a.ended_before, b.ended_before),
        state_equals=a.state_equals + b.state_equals,
    )


def _meet(a: frozenset[Any] | None, b: frozenset[Any] | None) -> frozenset[Any] | None:
    return b if a is None else a if b is None else a & b


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunPage:
    """One page of search results, newest first; ``next_cursor`` is None on the last."""

    runs: list[RunSummary]
    next_cursor: str | None


def encode_cursor(position: tuple[float, str]) -> str:
    """An opaque cursor: where the page ended, in the store's newest-first order."""
    return base64.urlsafe_b64encode(orjson.dumps(list(position))).decode()


def decode_cursor(cursor: str | None) -> tuple[float, str] | None:
    if cursor is None:
        return None
    try:
        created, run_id = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        if isinstance(created, int | float) and isinstance(run_id, str):
            return float(created), run_id
    except (ValueError, TypeError):
        pass
    raise ClientError(f"not a search cursor: {cursor!r}")
