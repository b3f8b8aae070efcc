"""``substantial show RUN_ID``: a run's summary and its timeline (``Conductor.history``).

Text from the store (names, values, messages, tracebacks) is drawn as rich
``Text``, never read as markup.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table
from rich.text import Text

from .. import RunStatus
from .._composition import child_event
from .._history import History, HistoryEntry
from .._shapes import history_doc, summary_doc, unserved
from ..conductor import Conductor
from ._common import console, cut, emit_json, wants_json, with_conductor

BAR = 12  # the widest duration bar, in characters
CHILD_EVENT = child_event("")  # the prefix of the event carrying a child's outcome


def register(app: typer.Typer) -> None:
    app.command(name="show")(show)


def show(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id.")],
    limit: Annotated[
        int | None,
        typer.Option("--limit", metavar="N", min=1, help="At most N timeline entries."),
    ] = None,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="Continue after a page (its next_cursor).")
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help='Print {"run": summary, "run_id", "entries", ...}.')
    ] = False,
) -> None:
    """Show a run's summary and timeline: every durable call, event and the end.

    A PENDING run that no live worker serves says so (``"unserved": true``)."""

    async def body(c: Conductor) -> None:
        history = await c.history(run_id, limit=limit, cursor=cursor)
        s = history.summary
        [waits] = [False] if s is None else await unserved(c, [s])
        if wants_json(ctx, json_):
            run = None if s is None else summary_doc(s, unserved=waits)
            emit_json({"run": run, **history_doc(history)})
        else:
            _draw(history, unserved=waits)

    with_conductor(ctx, body)


def _draw(history: History, *, unserved: bool) -> None:
    out = console()
    s = history.summary
    if s is not None and unserved:
        out.print(Text(unserved_warning(s.workflow, s.queue), style="bold yellow"), soft_wrap=True)
    if s is not None:
        head = Text()
        for label, value in (
            ("run", s.run_id),
            ("workflow", s.workflow),
            ("status", str(s.status)),
            ("queue", s.queue),
            ("parent", s.parent_id),
            ("started", _stamp(s.started_at)),
            ("ended", _stamp(s.ended_at)),
        ):
            if value:
                head.append(f"{label}: ", style="bold").append(str(value)).append("\n")
        if s.status == RunStatus.COMPLETED:
            head.append("result: ", style="bold").append(cut(_json(s.result), 200)).append("\n")
        elif s.error is not None:
            what = f"{s.error_type}: {s.error}" if s.error_type else s.error
            head.append("error: ", style="bold red").append(cut(what, 200)).append("\n")
        out.print(head, end="")
    out.print(_table(history.entries))
    end = next((e for e in history.entries if e.kind == "end" and e.traceback), None)
    if end is not None and end.traceback is not None:
        out.print(Text("traceback (the workflow's frames):", style="bold"))
        out.print(Text(end.traceback.rstrip()))
    if history.next_cursor is not None:
        out.print(f"more: --cursor {history.next_cursor}", highlight=False, markup=False)


def unserved_warning(workflow: str, queue: str) -> str:
    """The line that says a PENDING run waits for a worker that is not there."""
    return (
        f"warning: no live worker serves workflow {workflow!r} on queue {queue!r}; "
        "this run waits until one does"
    )


def _table(entries: list[HistoryEntry]) -> Table:
    table = Table("#", "kind", "name", "at", "start", "duration", "", "tries", "detail")
    longest = max((e.duration_ms or 0.0 for e in entries), default=0.0)
    for e in entries:
        style = "red" if e.failed else ""
        cells = (
            "" if e.seq is None or e.kind == "event" else str(e.seq),  # (its receive's)
            e.kind,
            _name(e.name),
            e.at or "",
            ""
            if e.started_at is None
            else e.started_at.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3],
            _duration(e.duration_ms),
            _bar(e.duration_ms, longest),
            "" if e.attempts is None else str(e.attempts),
            _detail(e),
        )
        table.add_row(*(Text(c) for c in cells), style=style)
    return table


def _name(name: str | None) -> str:
    """Names as written, but a child's outcome (an internal event) reads as such."""
    if name is None:
        return ""
    if name.startswith(CHILD_EVENT):
        return f"child {name[len(CHILD_EVENT) :]}"
    return name


def _detail(e: HistoryEntry) -> str:
    """What an entry says besides its columns: value, error, due time, payload."""
    if e.kind == "end":
        if e.error is not None:
            return cut(f"{e.error_type}: {e.error}" if e.error_type else e.error, 80)
        return cut(_json(e.value), 80)
    if e.error is not None:
        error = f"{e.error_type}: {e.error}" if e.error_type else e.error
        if not e.failed:  # a save that succeeded on a later attempt
            return cut(f"{_json(e.value)} (after {error})", 80)
        return cut(error, 80)
    if e.kind == "sleep" and isinstance(e.value, dict):
        due = e.value.get("due")
        when = datetime.fromisoformat(due) if isinstance(due, str) else None
        return f"until {_time_of_day(when)}" if when is not None else "until ?"
    if e.kind == "log" and isinstance(e.value, dict):
        fields = e.value.get("fields") or {}
        extra = f" {_json(fields)}" if fields else ""
        return cut(f"{e.value.get('message')}{extra}", 80)
    if e.kind == "event":
        taken = "not received yet" if e.seq is None else f"received by #{e.seq}"
        return cut(f"{_json(e.value)} ({taken})", 80)
    if e.kind == "child":
        return f"-> {e.value}"
    if e.kind == "continue":
        return f"-> {e.value}"
    if e.kind == "compact" and isinstance(e.value, dict):
        return f"log compacted (calls up to #{e.value.get('next')})"
    return cut(_json(e.value), 80)


def _duration(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms:.1f}ms"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _bar(ms: float | None, longest: float) -> str:
    if ms is None or longest <= 0:
        return ""
    return "█" * max(1, round(BAR * ms / longest))


def _time_of_day(t: datetime | None) -> str:
    return "" if t is None else t.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def _stamp(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
