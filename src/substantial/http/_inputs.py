"""Reading requests: bodies under a size cap, JSON, names, paging parameters.

Everything a client sends is checked here before the Conductor sees it, so a
malformed request is a 400 naming the problem. Two checks guard the stores
rather than the grammar: strings may not hold NUL (PostgreSQL text refuses it)
and names are at most ``MAX_NAME`` characters (a PostgreSQL index row is
bounded). JSON is decoded strictly: no NaN or infinity, no lone surrogate, no
integer outside 64 bits. The store's codec could not hold those as sent (it
would write null, or fail), so they are refused here rather than altered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request

from .._pushdown import decode_cursor
from .._types import RunStatus
from ..filters import compile_filter
from ._errors import ApiError, bad_input

MAX_NAME = 512  # characters in a run id, workflow, queue or event name
MAX_LIMIT = 500  # runs in one page
DEFAULT_LIMIT = 50

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_NAME",
    "check_name",
    "cursor_param",
    "json_body",
    "limit_param",
    "runs_filter",
]


async def json_body(request: Request, cap: int, *, empty: Any = None) -> Any:
    """The request's JSON body (``empty`` when there is none); 413 over ``cap`` bytes.

    The body is read in chunks and refused as soon as it passes the cap, so a
    client cannot make the server hold more than ``cap`` bytes of it."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > cap):
        raise _too_large(cap)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise _too_large(cap)
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_input("the client went away before sending the whole body") from None
    data = b"".join(chunks)
    if not data.strip():
        return empty
    return decode(data, "the body")


_INT_RANGE = (-(2**63), 2**64 - 1)  # what the store's codec (orjson) can write


def _int(text: str) -> int:
    value = int(text)
    if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        raise ValueError(f"integer {text[:24]}... is outside 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def decode(data: bytes | str, where: str) -> Any:
    """Strict JSON (see the module docstring); 400 naming ``where`` otherwise."""
    try:
        value = json.loads(data, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeError too
        raise bad_input(f"{where} is not valid JSON: {exc}") from None
    _strings_storable(value, where)
    return value


def _too_large(cap: int) -> ApiError:
    return ApiError(413, "PayloadTooLarge", f"the request body is over the limit of {cap} bytes")


def _strings_storable(value: Any, where: str) -> None:
    """Refuse NUL characters and lone surrogates in any string (keys included)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                raise bad_input(f"{where} holds a NUL character, which cannot be stored")
            if not _utf8(v):
                raise bad_input(f"{where} holds a lone surrogate, which is not Unicode text")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def check_name(value: Any, what: str) -> str:
    """A run id, workflow, queue or event name: a non-empty string a store can key on."""
    if not isinstance(value, str) or not value:
        raise bad_input(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME:
        raise bad_input(f"{what} is longer than {MAX_NAME} characters")
    if "\x00" in value or not _utf8(value):
        raise bad_input(f"{what} holds a NUL character or a lone surrogate")
    return value


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def limit_param(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    text = raw.strip()
    if (
        not (text.isascii() and text.isdigit() and len(text) <= 6)
        or not 1 <= int(text) <= MAX_LIMIT
    ):
        raise bad_input(f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
    return int(text)


def cursor_param(raw: str | None) -> str | None:
    """A cursor from a previous page; checked here so a forged one is a 400."""
    if raw is None or raw == "":
        return None
    position = decode_cursor(raw)  # ClientError (400) if it is not one
    if position is None or "\x00" in position[1]:
        raise bad_input(f"not a search cursor: {raw!r}")
    return raw


def runs_filter(statuses: list[str], raw: str | None) -> Mapping[str, Any] | None:
    """The filter for ``GET /api/runs``: ``status`` terms and ``filter`` (JSON), and-ed."""
    parts: list[Mapping[str, Any]] = []
    if statuses:
        parts.append({"status": {"in": sorted({_status(s) for s in statuses})}})
    if raw is not None and raw.strip():
        parts.append(_filter_json(raw))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {"and": parts}


def _status(text: str) -> str:
    try:
        return str(RunStatus(text.strip().upper()))
    except ValueError:
        names = ", ".join(RunStatus)
        raise bad_input(f"unknown status {text!r}; expected one of {names}") from None


def _filter_json(raw: str) -> Mapping[str, Any]:
    try:
        value = decode(raw, "the filter")
    except ApiError as exc:
        raise ApiError(400, "FilterError", f"invalid filter: {exc.message}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "FilterError", "invalid filter at <root>: expected a JSON object")
    compile_filter(value)  # FilterError (400) naming the path
    return value
