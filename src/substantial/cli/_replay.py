"""``export`` and ``replay-check``: runs' histories out of the store, and today's
code replayed over every run in flight before a deploy.

``replay-check APP`` loads APP as ``worker`` does, replays each unfinished run
of its workflows (or of ``--workflow W``) with no effects, and lists each run
that would diverge with the call the code makes now and the one the log
recorded, each with its code line. Exit 1 if any diverges (the deploy would
strand them), 0 if none does.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..conductor import Conductor
from ..errors import NonDeterminismError, SubstantialError
from ..testing._replay import replay_run
from ._common import FAILED, OK, emit_json, one_line, settings, usage, wants_json, with_conductor
from ._worker import load_app

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def register(app: typer.Typer) -> None:
    app.command(name="export")(export)
    app.command(name="replay-check")(replay_check)


def export(
    ctx: typer.Context,
    run_ids: Annotated[list[str], typer.Argument(metavar="RUN_ID...", help="Runs to export.")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="FILE", help="Write here (default: stdout)."),
    ] = None,
) -> None:
    """Write the runs' histories as JSON (docs/reference/history-format.md)."""

    async def body(c: Conductor) -> bytes:
        return (await c.export(run_ids)).dumps()

    data = with_conductor(ctx, body)
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        output.write_bytes(data)
    except OSError as exc:
        raise usage(f"cannot write {output}: {exc.strerror or exc}") from None


def replay_check(
    ctx: typer.Context,
    app_spec: Annotated[
        str, typer.Argument(metavar="APP", help="module:attr (a Conductor or workflow) or module.")
    ],
    workflow: Annotated[
        str | None, typer.Option("--workflow", metavar="W", help="Only the runs of W.")
    ] = None,
    json_: JsonFlag = False,
) -> int:
    """Replay every unfinished run against APP's code; list the runs that diverge."""
    conductor = load_app(app_spec, settings(ctx).backend)
    served = conductor.workflows
    if workflow is not None and workflow not in served:
        known = ", ".join(sorted(served)) or "none"
        raise usage(f"APP {app_spec!r} has no workflow {workflow!r} (it has: {known})")
    checked, diverged = asyncio.run(_check(conductor, workflow))
    if wants_json(ctx, json_):
        emit_json({"checked": checked, "diverged": diverged})
    else:
        for d in diverged:
            print(f"{d['run_id']} ({d['workflow']}): {d['error']}")
        verdict = "diverges" if len(diverged) == 1 else "diverge"
        print(f"{checked} unfinished runs replayed, {len(diverged)} {verdict}", file=sys.stderr)
    return FAILED if diverged else OK


async def _check(conductor: Conductor, only: str | None) -> tuple[int, list[dict[str, object]]]:
    """Replay each unfinished run of the served workflows; the divergent ones."""
    diverged: list[dict[str, object]] = []
    checked = 0
    try:
        await conductor.__aenter__()
        names = [only] if only is not None else sorted(conductor.workflows)
        for name in names:
            wf = conductor.workflows[name]
            for run_id in await conductor.unfinished_runs(name):
                checked += 1
                [history] = (await conductor.export([run_id])).runs
                try:
                    await replay_run(history, wf)
                except NonDeterminismError as exc:
                    diverged.append(_divergence(run_id, name, exc, exc.step))
                except SubstantialError as exc:  # a log it cannot read: not safe either
                    diverged.append(_divergence(run_id, name, exc, None))
    finally:
        await conductor.close()
    return checked, diverged


def _divergence(run_id: str, workflow: str, exc: Exception, step: int | None) -> dict[str, object]:
    doc: dict[str, object] = {"run_id": run_id, "workflow": workflow, "step": step}
    if isinstance(exc, NonDeterminismError):
        doc["code"] = exc.expected
        doc["recorded"] = exc.recorded
    doc["error"] = one_line(str(exc))
    return doc
