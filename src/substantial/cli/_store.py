"""``substantial migrate``: bring the store's schema up to date, print its version."""

from __future__ import annotations

from typing import Annotated

import typer

from ..conductor import Conductor
from ._common import emit_json, wants_json, with_conductor


def register(app: typer.Typer) -> None:
    app.command(name="migrate")(migrate)


def migrate(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help='Print {"version": N}.')] = False,
) -> None:
    """Apply the store's schema migrations and print its schema version."""
    version = with_conductor(ctx, Conductor.migrate)
    if wants_json(ctx, json_):
        emit_json({"version": version})
    elif version is None:
        print("nothing to migrate: this store has no schema version")
    else:
        print(version)
