"""``worker --processes N``: N worker processes under one supervisor.

Each child is ``python -m substantial worker APP ...`` (a whole worker of its
own: its own store connection, leases, signal handling). A child that dies
while the supervisor runs is started again, after a pause that grows while
children die young. SIGTERM or SIGINT to the supervisor sends SIGTERM to every
child, waits for them to hand back their leases (SIGKILL after STOP_GRACE),
and exits 0; a second signal kills them at once. A child that exits 2 (a
usage error: it cannot start) stops the whole group with 2 rather than
restarting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._common import USAGE, CliFailure
from ._signals import SIGNALS, HeldSignals

log = logging.getLogger("substantial.cli.supervisor")

STOP_GRACE = 30.0  # seconds a child gets to stop before SIGKILL
YOUNG = 5.0  # a child that dies younger than this delays its restart
MAX_PAUSE = 10.0


def worker_argv(
    app: str,
    *,
    backend: str | None,
    queues: tuple[str, ...],
    concurrency: int,
    lease: float | None,
    log_level: str,
    metrics_port: int | None = None,
) -> list[str]:
    """The command line of one child: a single-process worker with the same options
    (and its own metrics port: each process has its own counters)."""
    argv = [sys.executable, "-m", "substantial"]
    if backend is not None:
        argv += ["--backend", backend]
    argv += ["worker", app, "--concurrency", str(concurrency), "--log-level", log_level]
    for q in queues:
        argv += ["--queue", q]
    if lease is not None:
        argv += ["--lease", repr(lease)]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    return argv


@dataclass
class _Child:
    slot: int
    proc: asyncio.subprocess.Process
    started: float
    exited: asyncio.Task[int]


class Supervisor:
    """Runs ``processes`` children; ``argv(slot)`` is the command line of slot's child."""

    def __init__(self, argv: Callable[[int], list[str]], processes: int) -> None:
        self.argv = argv
        self.processes = processes
        self._children: dict[int, _Child] = {}
        self._pauses: dict[int, float] = {}
        self._stop = asyncio.Event()

    async def run(self, held: HeldSignals) -> None:
        """Supervise until a signal; one ``held`` from before this loop counts too."""
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        if held.first is not None:
            self._on_signal(held.first)
        try:
            for slot in range(self.processes):
                if self._stop.is_set():
                    break
                await self._spawn(slot)
            await self._watch()
        finally:
            await self._stop_all()
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        """The first signal stops the children gracefully; a second one kills them."""
        if self._stop.is_set():
            log.warning("%s received again: killing the worker processes", sig.name)
            for child in self._children.values():
                if child.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
            return
        log.info("%s received: stopping %d worker processes", sig.name, len(self._children))
        self._stop.set()

    async def _spawn(self, slot: int) -> None:
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
        # then stops every child itself (no child exits first and gets restarted).
        proc = await asyncio.create_subprocess_exec(*self.argv(slot), process_group=0)
        exited = asyncio.create_task(proc.wait(), name=f"substantial-child-{slot}")
        self._children[slot] = _Child(slot, proc, time.monotonic(), exited)
        log.info("worker process %d started (pid %d)", slot, proc.pid)

    async def _watch(self) -> None:
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                waits = {c.exited for c in self._children.values()}
                done, _ = await asyncio.wait(
                    {stopping, *waits}, return_when=asyncio.FIRST_COMPLETED
                )
                for child in [c for c in self._children.values() if c.exited in done]:
                    await self._restart(child)
        finally:
            stopping.cancel()

    async def _restart(self, child: _Child) -> None:
        code = child.exited.result()
        if self._stop.is_set():
            return
        if code == USAGE:
            raise CliFailure(
                f"worker process {child.slot} (pid {child.proc.pid}) could not start (exit 2)",
                USAGE,
            )
        log.warning(
            "worker process %d (pid %d) exited with %s; starting it again",
            child.slot,
            child.proc.pid,
            _exit_text(code),
        )
        pause = self._pause(child)
        if pause:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stop.wait()
            if self._stop.is_set():
                return
        await self._spawn(child.slot)

    def _pause(self, child: _Child) -> float:
        """No pause after a long life; a growing one while a slot keeps dying young."""
        if time.monotonic() - child.started >= YOUNG:
            self._pauses.pop(child.slot, None)
            return 0.0
        pause = min(MAX_PAUSE, max(0.5, 2 * self._pauses.get(child.slot, 0.25)))
        self._pauses[child.slot] = pause
        return pause

    async def _stop_all(self) -> None:
        live = [c for c in self._children.values() if c.proc.returncode is None]
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        if live:
            _, late = await asyncio.wait({c.exited for c in live}, timeout=STOP_GRACE)
            for child in live:
                if child.exited in late:
                    log.warning("worker process %d did not stop in time: SIGKILL", child.slot)
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
            await asyncio.gather(*(c.exited for c in live), return_exceptions=True)
        log.info("all worker processes stopped")


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"code {code}"
