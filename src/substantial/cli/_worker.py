"""``substantial worker APP``: load the user's workflows and serve them.

APP is ``module:attr`` naming a :class:`~substantial.Conductor` (its registered
workflows; its store unless ``--backend`` is given) or a ``@workflow``, or a bare
``module``, whose every ``@workflow`` object is served on the ``--backend`` store.
SIGTERM and SIGINT cancel the worker task, which releases its leases; the
process then exits 0. ``--processes N`` hands over to the supervisor.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import traceback
from types import ModuleType
from typing import Annotated, Any

import typer

from ..conductor import Conductor
from ..workflow import Workflow
from ._common import settings, usage
from ._signals import SIGNALS, HeldSignals
from ._supervisor import Supervisor, worker_argv

log = logging.getLogger("substantial.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(app: typer.Typer) -> None:
    app.command(name="worker")(worker)


def worker(
    ctx: typer.Context,
    app_spec: Annotated[
        str, typer.Argument(metavar="APP", help="module:attr (a Conductor or workflow) or module.")
    ],
    queue: Annotated[
        list[str] | None, typer.Option("--queue", metavar="Q", help="Repeatable; default: default.")
    ] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", metavar="N", min=1)] = 64,
    lease: Annotated[
        float | None,
        typer.Option(
            "--lease", metavar="S", min=0.001, help="Lease seconds (SUBSTANTIAL_LEASE_SECONDS, 30)."
        ),
    ] = None,
    processes: Annotated[
        int, typer.Option("--processes", metavar="N", min=1, help="Worker processes to supervise.")
    ] = 1,
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL")] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            metavar="P",
            min=0,
            max=65535,
            help="Serve Prometheus metrics on 127.0.0.1:P (with --processes N: P .. P+N-1).",
        ),
    ] = None,
) -> None:
    """Serve the workflows of APP until SIGTERM or SIGINT (then exit 0)."""
    held = HeldSignals()
    held.hold()  # a signal while APP loads stops the worker as soon as it runs
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise usage(f"unknown --log-level {log_level!r}; expected DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    backend = settings(ctx).backend
    conductor = load_app(app_spec, backend)  # in the supervisor too: fail fast, exit 2
    queues = tuple(queue or ["default"])
    if processes > 1:

        def argv(slot: int) -> list[str]:
            port = None if metrics_port is None else metrics_port + slot
            return worker_argv(
                app_spec, backend=backend, queues=queues, concurrency=concurrency, lease=lease,
                log_level=log_level, metrics_port=port,
            )  # fmt: skip

        asyncio.run(Supervisor(argv, processes).run(held))
        return
    if metrics_port is not None:
        serve_metrics_or_fail(metrics_port)
    asyncio.run(serve(conductor, held, queues=queues, concurrency=concurrency, lease=lease))


def serve_metrics_or_fail(port: int) -> None:
    """Metrics for this process on 127.0.0.1:port, or one clear line (exit 2)."""
    from .. import telemetry
    from ..errors import ConfigurationError

    try:
        server = telemetry.serve_metrics(port)
    except ConfigurationError as exc:  # prometheus-client is not installed
        raise usage(str(exc)) from None
    except OSError as exc:
        raise usage(f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    log.info("metrics on http://127.0.0.1:%d/metrics", server.port)


async def serve(
    conductor: Conductor,
    held: HeldSignals,
    *,
    queues: tuple[str, ...],
    concurrency: int,
    lease: float | None,
) -> None:
    """Run one worker until a signal cancels it; leases are released on the way out."""
    loop = asyncio.get_running_loop()
    task = conductor.run(queues=queues, concurrency=concurrency, lease=lease, handle_sigterm=False)
    for sig in SIGNALS:
        loop.add_signal_handler(sig, _stop, loop, task, sig)
    if held.first is not None:  # it came while APP loaded: stop now, as on a later one
        _stop(loop, task, held.first)
    try:
        await asyncio.wait({task})
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
        await conductor.close()
    failure = None if task.cancelled() else task.exception()
    if failure is not None:
        raise failure


def _stop(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None], sig: signal.Signals) -> None:
    """The first signal stops the worker gracefully; a second one acts as if this
    process had no handler (SIGINT: KeyboardInterrupt, exit 130; SIGTERM: killed)."""
    log.info("%s received: stopping the worker (pid %d)", sig.name, os.getpid())
    for s in SIGNALS:
        loop.remove_signal_handler(s)
    task.cancel()


# -- loading APP ----------------------------------------------------------------------


def load_app(spec: str, backend: str | None) -> Conductor:
    """The Conductor that serves APP; ``backend`` (from --backend) overrides its store."""
    module_name, _, attr = spec.partition(":")
    if not module_name or (":" in spec and not attr):
        raise usage(f"APP must be 'module' or 'module:attr', got {spec!r}")
    module = _import(module_name)
    if not attr:
        found = _module_workflows(module)
        if not found:
            raise usage(f"module {module_name!r} defines no @workflow; name one as module:attr")
        return _conductor(backend, found)
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise usage(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(target, Conductor):
        if not target.workflows:
            raise usage(f"the Conductor {spec!r} has no registered workflows")
        return target if backend is None else _conductor(backend, list(target.workflows.values()))
    if isinstance(target, Workflow):
        return _conductor(backend, [target])
    raise usage(f"{spec!r} is a {type(target).__name__}; expected a Conductor or a @workflow")


def _import(name: str) -> ModuleType:
    # As `python -m` would: modules in the current directory are importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise usage(f"cannot import {name!r}: no module named {exc.name!r}") from None
        raise usage(f"importing {name!r} failed: {_where(exc)}") from None
    except Exception as exc:
        raise usage(f"importing {name!r} failed: {_where(exc)}") from None


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"


def _module_workflows(module: ModuleType) -> list[Workflow[Any]]:
    seen: dict[str, Workflow[Any]] = {}
    for value in vars(module).values():
        if isinstance(value, Workflow):
            seen.setdefault(value.name, value)
    return list(seen.values())


def _conductor(backend: str | None, workflows: list[Workflow[Any]]) -> Conductor:
    conductor = Conductor(backend)
    conductor.register(*workflows)
    return conductor
