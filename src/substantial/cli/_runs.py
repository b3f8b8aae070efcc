"""Commands about runs: start, send, cancel, result, runs, logs."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table
from rich.text import Text

from .. import LogRecord, RunStatus, RunSummary
from .._shapes import iso, log_doc, summary_doc, unserved
from ..conductor import Conductor, RunHandle
from ..errors import RunError
from ..filters import parse_filter_json
from ._common import (
    FAILED,
    CliFailure,
    console,
    cut,
    emit_json,
    one_line,
    parse_json,
    parse_object,
    status_filter,
    usage,
    wants_json,
    with_conductor,
)

FOLLOW_POLL = 0.5  # seconds between log reads while following (there is no log hint)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
RunId = Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id.")]


def register(app: typer.Typer) -> None:
    for command in (start, send, cancel, result, runs, logs):
        app.command(name=command.__name__)(command)


# -- start / send / cancel / result ---------------------------------------------------


def start(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="The workflow's registered name.")],
    kwargs: Annotated[
        str | None, typer.Option("--kwargs", metavar="JSON", help="Keyword arguments.")
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", metavar="ID", help="Idempotent: first wins.")
    ] = None,
    queue: Annotated[str, typer.Option("--queue", metavar="Q")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Wait and print the result.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", metavar="S", min=0, help="With --wait: give up after S s."),
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option("--priority", metavar="N", help="Lower first, on a priority queue."),
    ] = None,
    concurrency_key: Annotated[
        str | None,
        typer.Option("--concurrency-key", metavar="K", help="The queue's concurrency group."),
    ] = None,
    delay: Annotated[
        float | None,
        typer.Option("--delay", metavar="S", min=0, help="No worker claims it for S s."),
    ] = None,
) -> None:
    """Start a run and print its id (with --wait: the result as JSON, the id on stderr)."""
    args = parse_object(kwargs, "--kwargs")
    if timeout is not None and not wait:
        raise usage("--timeout needs --wait")

    async def body(c: Conductor) -> None:
        handle = await c.start(
            workflow,
            args,
            run_id=run_id,
            queue=queue,
            priority=priority,
            concurrency_key=concurrency_key,
            delay=delay,
        )
        if not wait:
            print(handle.run_id, flush=True)
            return
        print(handle.run_id, file=sys.stderr, flush=True)
        emit_json(await _result(handle, timeout))

    with_conductor(ctx, body)


def send(
    ctx: typer.Context,
    run_id: RunId,
    name: Annotated[str, typer.Argument(help="The event's name.")],
    payload: Annotated[
        str | None, typer.Argument(metavar="[JSON]", help="The event's value (default null).")
    ] = None,
) -> None:
    """Send an event to a run (once this returns, it is never lost)."""
    value = None if payload is None else parse_json(payload, "the event payload")
    with_conductor(ctx, lambda c: c.handle(run_id).send(name, value))


def cancel(
    ctx: typer.Context,
    run_id: RunId,
    revert: Annotated[
        bool, typer.Option("--revert", help="Run the recorded compensations first (REVERTED).")
    ] = False,
) -> None:
    """Cancel a run and its descendants (no-op on a run that already ended)."""
    with_conductor(ctx, lambda c: c.handle(run_id).cancel(revert=revert))


def result(
    ctx: typer.Context,
    run_id: RunId,
    timeout: Annotated[
        float | None, typer.Option("--timeout", metavar="S", min=0, help="Give up after S s.")
    ] = None,
) -> None:
    """Wait for a run to end and print its result as JSON (exit 1 if it did not complete)."""

    async def body(c: Conductor) -> None:
        emit_json(await _result(c.handle(run_id), timeout))

    with_conductor(ctx, body)


async def _result(handle: RunHandle[Any], timeout: float | None) -> Any:
    # result() waits out store outages; ask once first so that an unknown run or an
    # unreachable store is an immediate error rather than a wait.
    await handle.status()
    try:
        return await handle.result(timeout=timeout)
    except TimeoutError:
        raise CliFailure(
            f"run {handle.run_id!r} did not end within {timeout:g} s", FAILED
        ) from None


# -- runs ------------------------------------------------------------------------------


def runs(
    ctx: typer.Context,
    workflow: Annotated[
        str | None, typer.Argument(help="Only runs of this workflow.", show_default=False)
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", metavar="S", help="Repeatable, e.g. --status failed."),
    ] = None,
    filter_: Annotated[
        str | None, typer.Option("--filter", metavar="JSON", help="The filter grammar as JSON.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", metavar="N", min=1)] = 50,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="Continue after a page (its next_cursor).")
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """List runs, newest first."""
    parts = [p for p in (status_filter([_status(s) for s in status or []]),) if p is not None]
    if filter_ is not None:
        parts.append(parse_filter_json(filter_))
    expr = None if not parts else parts[0] if len(parts) == 1 else {"and": parts}

    async def body(c: Conductor) -> None:
        page = await c.search_page(workflow, expr, limit=limit, cursor=cursor)
        flags = await unserved(c, page.runs)  # one workers() lookup for the page
        if wants_json(ctx, json_):
            docs = [summary_doc(s, unserved=f) for s, f in zip(page.runs, flags, strict=True)]
            emit_json({"runs": docs, "next_cursor": page.next_cursor})
            return
        _print_runs(page.runs, flags, page.next_cursor)

    with_conductor(ctx, body)


def _status(text: str) -> str:
    try:
        return str(RunStatus(text.upper()))
    except ValueError:
        names = ", ".join(RunStatus)
        raise usage(f"unknown --status {text!r}; expected one of {names}") from None


def _print_runs(found: list[RunSummary], flags: list[bool], next_cursor: str | None) -> None:
    table = Table("run id", "workflow", "status", "started", "duration", "result / error")
    table.columns[0].no_wrap = True
    now = datetime.now(UTC)
    for s, waits in zip(found, flags, strict=True):
        status = f"{s.status} (no worker)" if waits else str(s.status)
        cells = (s.run_id, s.workflow, status, _when(s.started_at), _duration(s, now))
        # Text, not str: values from the store are never read as rich markup.
        table.add_row(*(Text(c) for c in (*cells, _outcome(s))))
    out = console()
    out.print(table)
    if next_cursor is not None:
        out.print(f"more: --cursor {next_cursor}", highlight=False, markup=False)


def _when(t: datetime | None) -> str:
    return "" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(s: RunSummary, now: datetime) -> str:
    if s.started_at is None:
        return ""
    seconds = ((s.ended_at or now) - s.started_at).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _outcome(s: RunSummary) -> str:
    if s.error is not None:
        return cut(f"{s.error_type}: {s.error}" if s.error_type else s.error)
    if s.status == RunStatus.COMPLETED or s.result is not None:
        return cut(orjson.dumps(s.result).decode())
    return ""


# -- logs ------------------------------------------------------------------------------


def logs(
    ctx: typer.Context,
    run_id: RunId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream new lines until the run ends.")
    ] = False,
    json_: JsonFlag = False,
) -> None:
    """Print a run's log lines (with --follow --json: one JSON object per line)."""
    as_json = wants_json(ctx, json_)

    async def body(c: Conductor) -> None:
        handle = c.handle(run_id)
        if follow:
            await _follow(handle, _json_line if as_json else _text_line)
            return
        lines = await handle.logs()
        if as_json:
            emit_json({"logs": [log_doc(line) for line in lines]})
        else:
            for line in lines:
                _text_line(line)

    with_conductor(ctx, body)


def _text_line(line: LogRecord) -> None:
    fields = f" {orjson.dumps(line.fields).decode()}" if line.fields else ""
    print(f"{iso(line.at)} {line.level.upper():<7} {one_line(line.message)}{fields}", flush=True)


def _json_line(line: LogRecord) -> None:
    print(orjson.dumps(log_doc(line)).decode(), flush=True)


async def _follow(handle: RunHandle[Any], emit: Any) -> None:
    """Print lines as they appear; the end of the run is awaited (hint-driven), new
    lines are read every FOLLOW_POLL, and one last read after the end gets the rest."""
    await handle.status()  # an unknown run is an error now, not a wait
    ended = asyncio.create_task(_ended(handle))
    seen = 0
    try:
        while True:
            finished = ended.done()
            lines = await handle.logs()
            for line in lines[seen:]:
                emit(line)
            seen = len(lines)
            if finished:
                return
            await asyncio.wait({ended}, timeout=FOLLOW_POLL)
    finally:
        ended.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ended


async def _ended(handle: RunHandle[Any]) -> None:
    with contextlib.suppress(RunError):
        await handle.result()
