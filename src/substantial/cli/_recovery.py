"""Recovery commands and the worker registry: workers, resume, fork.

``cancel RUN_ID --revert`` lives with ``cancel`` in ``_runs``. Each command is one
call of the client API (``Conductor.workers``, ``RunHandle.resume``,
``Conductor.fork``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from .._shapes import worker_doc
from ..conductor import Conductor
from ._common import console, emit_json, wants_json, with_conductor

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
RunId = Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id.")]


def register(app: typer.Typer) -> None:
    for command in (workers, resume, fork):
        app.command(name=command.__name__)(command)


def workers(ctx: typer.Context, json_: JsonFlag = False) -> None:
    """Live workers: id, host, pid, queues, workflows served, started, last beat."""

    async def body(c: Conductor) -> None:
        found = await c.workers()
        if wants_json(ctx, json_):
            emit_json({"workers": [worker_doc(w) for w in found]})
            return
        table = Table("worker", "host", "pid", "queues", "workflows", "started", "last beat")
        now = datetime.now(UTC)
        for w in found:
            table.add_row(
                w.worker_id,
                w.host,
                str(w.pid),
                ", ".join(w.queues),
                ", ".join(w.workflows),
                w.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                f"{max((now - w.last_beat).total_seconds(), 0.0):.1f}s ago",
            )
        console().print(table)

    with_conductor(ctx, body)


def resume(ctx: typer.Context, run_id: RunId) -> None:
    """Replay a FAILED or CANCELLED run with the deployed code; the failed call runs again."""
    with_conductor(ctx, lambda c: c.handle(run_id).resume())


def fork(
    ctx: typer.Context,
    run_id: RunId,
    from_step: Annotated[
        int, typer.Option("--from-step", metavar="N", min=0, help="Re-run from durable call N.")
    ],
    new_id: Annotated[
        str | None, typer.Option("--run-id", metavar="ID", help="The new run's id.")
    ] = None,
    json_: JsonFlag = False,
) -> None:
    """Start a new run from RUN_ID's log before step N (same workflow and kwargs); print its id."""

    async def body(c: Conductor) -> None:
        handle = await c.fork(run_id, from_step=from_step, run_id=new_id)
        if wants_json(ctx, json_):
            emit_json({"run_id": handle.run_id})
        else:
            print(handle.run_id, flush=True)

    with_conductor(ctx, body)
