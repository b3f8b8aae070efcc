"""``substantial dashboard``: serve the HTTP API and the dashboard with uvicorn.

The token comes from ``--token`` or ``SUBSTANTIAL_TOKEN``; without one the server
refuses a non-loopback ``--host`` (exit 2, one line naming the address).
uvicorn handles SIGTERM and SIGINT: the server stops, then raises the signal
again for the handler it found, which here exits 0 (as a worker does).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Annotated

import typer

from ..conductor import Conductor
from ._common import settings


def register(app: typer.Typer) -> None:
    app.command(name="dashboard")(dashboard)


def dashboard(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="0: any free port.")] = 8700,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="SUBSTANTIAL_TOKEN",
            help="Bearer token every /api route wants (env: SUBSTANTIAL_TOKEN).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the HTTP API and the dashboard (docs/reference/http.md) until SIGTERM or SIGINT."""
    from ..http import check_bind, serve  # ConfigurationError (exit 2) without the extra

    check_bind(host, token or None)
    # The API's access log (method, path, status; never a query or a body) on stderr.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    serve(Conductor(settings(ctx).backend), host=host, port=port, token=token or None)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
