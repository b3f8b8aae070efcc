"""The ``substantial`` command line (``pip install 'substantial[cli]'``).

A thin layer over the :class:`~substantial.Conductor` client; see
docs/reference/cli.md. Exit codes: 0 ok; 1 the thing asked about failed (a run
that ended FAILED, CANCELLED or REVERTED, an expired ``--timeout``); 2 a usage or
input error (bad option or JSON, unknown run, malformed filter, unreachable or
misconfigured store); 3 an internal error (a bug: please report it). Every
error is one line on stderr; ``SUBSTANTIAL_DEBUG=1`` adds the traceback of an
internal error.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated

import typer

from . import _dashboard, _lint, _recovery, _replay, _runs, _show, _store, _worker
from ._common import INTERNAL, OK, Settings, click_style, describe

__all__ = ["app", "main"]

app = typer.Typer(
    name="substantial",
    help="Operate Substantial runs and workers without writing Python.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    ctx: typer.Context,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            metavar="URL",
            help="Store URL; default: SUBSTANTIAL_BACKEND, else sqlite:///.substantial/state.db.",
            show_default=False,
        ),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON output for every command.")] = False,
) -> None:
    """Global options go before the command: substantial --backend URL runs."""
    ctx.obj = Settings(backend=backend, json=json_)


_runs.register(app)
_show.register(app)
_worker.register(app)
_store.register(app)
_dashboard.register(app)
_recovery.register(app)
_replay.register(app)
_lint.register(app)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (every error reported as one line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = app(args=args, prog_name="substantial", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 130
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return OK
    except Exception as exc:
        return _report(exc)
    return rv if isinstance(rv, int) else OK


def _report(exc: Exception) -> int:
    found = click_style(exc)
    message, code = found if found is not None else describe(exc)
    if code == INTERNAL and os.environ.get("SUBSTANTIAL_DEBUG"):
        traceback.print_exception(exc)
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


def _quiet_stdout() -> None:
    """After a closed pipe (``substantial runs | head``), flushing at exit must not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main() -> None:
    sys.exit(run())
