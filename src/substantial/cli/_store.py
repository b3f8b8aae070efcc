"""``substantial migrate``: bring the store's schema up to date, print its version."""

from __future__ import annotations

import sys
from typing import Annotated, Any

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
    version = with_conductor(ctx, schema_version)
    if wants_json(ctx, json_):
        emit_json({"version": version})
    elif version is None:
        print("nothing to migrate: this store has no schema version")
    else:
        print(version)


async def schema_version(conductor: Conductor) -> int | None:
    """Private stand-in for a ``Conductor.migrate()``: the store's own ``migrate()``
    if it has one (PostgreSQL); otherwise opening applied any upgrade (SQLite), and
    the version is the one its module declares, if any."""
    backend: Any = conductor.backend
    migrate = getattr(backend, "migrate", None)
    if callable(migrate):
        return int(await migrate())
    declared = getattr(sys.modules.get(type(backend).__module__), "SCHEMA_VERSION", None)
    return declared if isinstance(declared, int) else None
