"""The worker process of the crash matrix: ``python -m substantial.testing._crash_worker SPEC``.

It serves its queues like any worker, with a probe on its journal that writes
one line per effect to the matrix's effects file and, if told a boundary, kills
its own process with SIGKILL there: just before the k-th save attempt's
function runs (``before_effect``), just after it returns and before its record
is written (``after_effect``), or just after that record is durable
(``after_record``). SPEC is a JSON object (see ``_crash.WorkerSpec``).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from ..conductor import Conductor
from ..workflow import Workflow


class _Probe:
    def __init__(self, effects: str, crash: tuple[int, str] | None) -> None:
        self._fd = os.open(effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._crash = crash
        self._attempts = 0  # save attempts started in this process (one run per process)
        self._recorded = 0  # ... and their records made durable

    def _die_at(self, n: int, point: str) -> None:
        if self._crash == (n, point):
            os.kill(os.getpid(), signal.SIGKILL)

    def _done(self, run_id: str, name: str) -> None:
        line = orjson.dumps({"run": run_id, "step": name, "pid": os.getpid()}) + b"\n"
        os.write(self._fd, line)  # one small O_APPEND write: whole, whatever happens next

    def effect(self, run_id: str, name: str, f: Callable[[], Any]) -> Callable[[], Any]:
        self._attempts += 1
        n = self._attempts
        if inspect.iscoroutinefunction(f):

            async def run_async() -> Any:
                self._die_at(n, "before_effect")
                try:
                    return await f()
                finally:
                    self._done(run_id, name)
                    self._die_at(n, "after_effect")

            return run_async

        def run() -> Any:
            self._die_at(n, "before_effect")
            try:
                out = f()
            except BaseException:
                self._done(run_id, name)
                self._die_at(n, "after_effect")
                raise
            if not inspect.isawaitable(out):
                self._done(run_id, name)
                self._die_at(n, "after_effect")
                return out
            pending = out  # a lambda returning a coroutine: the effect is in awaiting it

            async def finish() -> Any:
                try:
                    return await pending
                finally:
                    self._done(run_id, name)
                    self._die_at(n, "after_effect")

            return finish()

        return run

    def appended(self, run_id: str, records: Sequence[bytes]) -> None:
        for data in records:
            rec = orjson.loads(data)
            if rec.get("p") == "save" and rec.get("k") in ("call", "try"):
                self._recorded += 1
                self._die_at(self._recorded, "after_record")


def _workflow(spec: str) -> Workflow[Any]:
    module, _, attr = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    if not isinstance(target, Workflow):
        raise SystemExit(f"crash worker: {spec} is not a @workflow")
    return target


async def _serve(spec: dict[str, Any]) -> None:
    wf = _workflow(spec["app"])
    conductor = Conductor(spec["backend"])
    conductor.register(wf)
    crash = spec.get("crash")
    conductor.journal.set_probe(_Probe(spec["effects"], None if crash is None else tuple(crash)))
    await conductor.run(queues=spec["queues"], lease=spec["lease"])
    await conductor.close()


if __name__ == "__main__":
    asyncio.run(_serve(orjson.loads(sys.argv[1])))
