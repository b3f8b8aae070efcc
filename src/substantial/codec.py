"""JSON in and out of the store.

Values are stored as JSON (orjson). Nothing is ever unpickled: bytes in a store
can only become plain JSON data, never code. ``coerce`` turns that data back
into a declared type (pydantic models, dataclasses, datetime, UUID, ...) with
pydantic, so a workflow sees the same typed value live and on replay.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import PayloadTooLarge, SerializationError

_OPTS = orjson.OPT_SERIALIZE_NUMPY


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(value: Any, *, what: str, limit: int | None = None) -> bytes:
    """Encode ``value``; ``what`` names the call in the error ("save() at x.py:3")."""
    try:
        data = orjson.dumps(value, default=_default, option=_OPTS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise SerializationError(f"{what}: value is not JSON-serializable ({exc})") from None
    size = len(data)
    if limit is not None and size > limit:
        raise PayloadTooLarge(
            f"{what}: encoded value is {size} bytes, over the limit of {limit} bytes"
        )
    if size <= _SMALL:
        # orjson writes into a 1 KiB malloc() block and shrinks it; a store that
        # keeps the result (the memory store's log, a batch being built) leaves
        # that heap fragmented, and the next encode's block then costs ~3 µs to
        # find instead of ~0.3. A small record is copied into Python's own
        # allocator instead (a fraction of a µs): the block is freed at once and
        # reused by the next encode. (Measured: bench/run.py, memory ms/step.)
        data = b"%b" % data
    return data


_SMALL = 512  # bytes: what Python's small-object allocator serves


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


_INT_RANGE = range(-(2**63), 2**64)  # what orjson encodes as an integer


def to_json(value: Any, *, what: str, limit: int | None = None) -> Any:
    """The JSON form of ``value`` exactly as a replay will see it.

    ``None``, a bool and an int in orjson's range are their own JSON form (the
    common step results), so they skip the encode-decode round trip."""
    if value is None or value is True or value is False:
        return value
    if type(value) is int and value in _INT_RANGE and (limit is None or limit >= 21):
        return value
    return orjson.loads(dumps(value, what=what, limit=limit))


@lru_cache(maxsize=256)
def adapter(tp: Any) -> TypeAdapter[Any]:
    """The (cached) pydantic adapter that validates values of ``tp``."""
    return TypeAdapter(tp)


def coerce(value: Any, tp: Any, *, what: str) -> Any:
    """Turn stored JSON back into ``tp``; None means "keep the JSON value"."""
    if tp is None:
        return value
    try:
        return adapter(tp).validate_python(value)
    except ValidationError as exc:
        raise SerializationError(f"{what}: stored value does not fit {tp!r}: {exc}") from None
