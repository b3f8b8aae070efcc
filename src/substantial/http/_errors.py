"""Errors as the API answers them: ``{"error": {"type", "message"}}`` and a status.

Every exception a route can meet maps to one status here, so bad input is a 4xx
whatever path it took (the API's own checks or the Conductor's) and a 500 means a
bug or a broken store. Messages go to the client only, never to the server log:
some quote the input.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import (
    BackendUnavailable,
    ClientError,
    ConfigurationError,
    FilterError,
    PayloadTooLarge,
    RunFinished,
    RunNotFound,
    SerializationError,
    SubstantialError,
)

__all__ = [
    "ApiError",
    "JSONResponse",
    "answer",
    "bad_input",
    "error_response",
    "exception_handlers",
]

log = logging.getLogger("substantial.http")


class JSONResponse(Response):
    """JSON rendered by orjson (the codec the store uses: same values, same shapes)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    """A request the API refuses: its status, the error type it names, a message."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


def bad_input(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def error_response(status: int, type_: str, message: str, **headers: str) -> JSONResponse:
    body = {"error": {"type": type_, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers or None)


# Most specific first: the first isinstance match decides.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (RunNotFound, 404),
    (RunFinished, 409),
    (PayloadTooLarge, 413),
    (FilterError, 400),
    (SerializationError, 400),  # kwargs or a payload that cannot be stored as JSON
    (ClientError, 400),
    (BackendUnavailable, 503),
    (ConfigurationError, 500),
)


def status_of(exc: BaseException) -> int:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def answer(request: Request, exc: Exception) -> JSONResponse:
    """The response for an exception a route raised (see the module docstring)."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.type, exc.message)
    if isinstance(exc, SubstantialError):
        status = status_of(exc)
        if status >= 500:  # the type only: the message may quote a value
            log.warning("%s %s: %s", request.method, request.url.path, type(exc).__name__)
        return error_response(status, type(exc).__name__, str(exc))
    # A bug: logged with its traceback but not its message (it may quote a value).
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error(
        "%s %s: internal error %s\n%s",
        request.method,
        request.url.path,
        type(exc).__name__,
        frames,
    )
    return error_response(500, "InternalError", "internal error (see the server's log)")


_HTTP_TYPES = {404: "NotFound", 405: "MethodNotAllowed"}


async def _http(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in the same shape."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    name = _HTTP_TYPES.get(exc.status_code, "HTTPError")
    return error_response(exc.status_code, name, str(exc.detail), **headers)


def exception_handlers() -> dict[Any, Any]:
    return {HTTPException: _http}
