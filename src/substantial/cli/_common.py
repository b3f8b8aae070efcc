"""What every command shares: the store option, output (tables, JSON), errors.

The CLI talks to the store only through the :class:`~substantial.Conductor`
client. Errors travel as exceptions up to :func:`substantial.cli.main`, which
turns each into one line on stderr and an exit code (see ``exit_code``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import typer
from rich.console import Console

from .. import LogRecord, RunSummary
from ..conductor import Conductor
from ..errors import RunError, RunFailed, SubstantialError

T = TypeVar("T")

OK = 0
FAILED = 1  # the thing asked about failed: the run ended badly, or a wait expired
USAGE = 2  # a usage or input error: bad option, bad JSON, unknown run, unreachable store
INTERNAL = 3  # a bug: an exception that is not a SubstantialError


class CliFailure(Exception):
    """An outcome the CLI reports as one line and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def usage(message: str) -> CliFailure:
    return CliFailure(message, USAGE)


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """The global options, given before the command."""

    backend: str | None = None  # None: SUBSTANTIAL_BACKEND, else the embedded default
    json: bool = False


def settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings()


def wants_json(ctx: typer.Context, flag: bool) -> bool:
    return flag or settings(ctx).json


def with_conductor(ctx: typer.Context, body: Callable[[Conductor], Awaitable[T]]) -> T:
    """Run ``body`` with a Conductor on the chosen store, opened and closed here."""

    async def go() -> T:
        conductor = Conductor(settings(ctx).backend)
        try:
            await conductor.__aenter__()
            return await body(conductor)
        finally:
            await conductor.close()

    return asyncio.run(go())


# -- input ---------------------------------------------------------------------------


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise usage(f"{what} is not valid JSON: {exc}") from None


def parse_object(text: str | None, what: str) -> dict[str, Any]:
    if text is None:
        return {}
    value = parse_json(text, what)
    if not isinstance(value, dict):
        raise usage(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# -- output --------------------------------------------------------------------------


def console() -> Console:
    """Tables go to stdout; off a terminal, wide enough not to fold run ids."""
    out = Console()
    return out if out.is_terminal else Console(width=200)


def emit_json(value: Any) -> None:
    """One JSON document on stdout (indented on a terminal, one line otherwise)."""
    option = orjson.OPT_INDENT_2 if sys.stdout.isatty() else 0
    sys.stdout.write(orjson.dumps(value, option=option).decode() + "\n")
    sys.stdout.flush()


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def summary_doc(s: RunSummary) -> dict[str, Any]:
    """The summary shape of DESIGN.md section 6 (shared with the HTTP API)."""
    return {
        "run_id": s.run_id,
        "workflow": s.workflow,
        "status": str(s.status),
        "queue": s.queue,
        "parent_id": s.parent_id,
        "started_at": iso(s.started_at),
        "ended_at": iso(s.ended_at),
        "result": s.result,
        "error": s.error,
        "error_type": s.error_type,
    }


def log_doc(line: LogRecord) -> dict[str, Any]:
    return {"level": line.level, "message": line.message, "fields": line.fields, "at": iso(line.at)}


def one_line(text: str) -> str:
    return " ".join(text.split())


def cut(text: str, width: int = 48) -> str:
    text = one_line(text)
    return text if len(text) <= width else text[: width - 1] + "…"


# -- errors --------------------------------------------------------------------------


def run_error_line(exc: RunError) -> str:
    if isinstance(exc, RunFailed):
        what = f"{exc.error_type}: {exc}" if exc.error_type else str(exc)
        return f"run {exc.run_id!r} failed: {what}"
    return str(exc)  # "run '...' was cancelled" / "was reverted"


def describe(exc: BaseException) -> tuple[str, int]:
    """The one line and the exit code for an exception that reached the top."""
    if isinstance(exc, CliFailure):
        return exc.message, exc.code
    if isinstance(exc, RunError):
        return run_error_line(exc), FAILED
    if isinstance(exc, SubstantialError):
        return str(exc), USAGE
    return f"internal error: {type(exc).__name__}: {exc}", INTERNAL


def click_style(exc: BaseException) -> tuple[str, int] | None:
    """Typer/click usage errors (vendored or not): their message and exit code."""
    code = getattr(exc, "exit_code", None)
    fmt = getattr(exc, "format_message", None)
    if not isinstance(code, int) or not callable(fmt):
        return None
    message = str(fmt())
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    if path:
        message = f"{message} (see '{path} --help')"
    return message, code


def status_filter(statuses: list[str]) -> Mapping[str, Any] | None:
    if not statuses:
        return None
    return {"status": {"in": sorted(set(statuses))}}
