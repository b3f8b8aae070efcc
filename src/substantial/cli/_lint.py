"""``lint``: what breaks determinism in workflow bodies, found in the source.

A static check (:mod:`substantial.lint`) for CI and editors, before any run
replays: it reads the files and opens no store. Exit 1 if anything is found,
so that a pipeline fails on it; 2 for a path or module that does not exist or
a file that does not parse.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from ..lint import lint_paths
from ._common import FAILED, OK, emit_json, wants_json

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def register(app: typer.Typer) -> None:
    app.command(name="lint")(lint)


def lint(
    ctx: typer.Context,
    targets: Annotated[
        list[str],
        typer.Argument(
            metavar="MODULE...",
            help="Python files, directories (their *.py, recursively) or dotted module names.",
        ),
    ],
    json_: JsonFlag = False,
) -> int:
    """Flag clock, randomness, new ids, environment, I/O and asyncio.sleep in workflow bodies."""
    findings = lint_paths(targets)
    if wants_json(ctx, json_):
        emit_json([dataclasses.asdict(f) for f in findings])
    else:
        for finding in findings:
            print(finding)
    return FAILED if findings else OK
