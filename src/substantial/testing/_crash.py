"""The crash matrix: a workflow killed with SIGKILL at every step boundary.

One clean run first (the baseline) counts the save attempts the workflow makes
and gives the result every other run must reach. Then, for each attempt ``k``
and each boundary (before its function runs; after it returns, before its
record; after the record), a run of its own, on a queue of its own, is driven by
a worker process that kills itself at that boundary (all of them at once); one
fresh worker process then finishes them all once their leases expire.

Every effect call is written down by the worker that made it, so the report
says, per case, how many times each step's function ran. What the guarantee
promises, the matrix checks: every case ends as the baseline did, and only the
step in flight at an ``after_effect`` kill may run twice (make that one
idempotent, e.g. with ``c.idempotency_key()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from ..conductor import Conductor, RunHandle
from ..errors import ConfigurationError, RunError
from ..workflow import Workflow
from ._either import AwaitableResult, run_to_end

__all__ = ["POINTS", "CrashCase", "CrashMatrix", "crash_matrix"]

Point = Literal["before_effect", "after_effect", "after_record"]
POINTS: tuple[Point, ...] = ("before_effect", "after_effect", "after_record")


@dataclass(frozen=True, slots=True)
class CrashCase:
    """One boundary: attempt ``attempt`` (1-based) of step ``step``, killed at ``point``,
    in run ``run_id``."""

    run_id: str
    attempt: int
    step: str
    point: Point
    outcome: tuple[str, Any]  # (status, result or error message)
    runs: Mapping[str, int]  # step name -> times its function ran, both workers together
    extra: Mapping[str, int]  # ... beyond the baseline's count
    reached: bool = True  # the worker died at the boundary (False: it never got there)


@dataclass(frozen=True, slots=True)
class CrashMatrix(AwaitableResult):
    """The baseline and every case (see the module docstring)."""

    baseline: tuple[str, Any]
    steps: Sequence[str]  # the baseline's save attempts, by step name, in order
    cases: Sequence[CrashCase] = field(default_factory=list)

    @property
    def violations(self) -> list[str]:
        """What breaks the guarantee: an outcome other than the baseline's, a boundary
        never reached, a step run again that was not the one in flight."""
        out = []
        for case in self.cases:
            where = f"killed {case.point} of attempt {case.attempt} ({case.step!r})"
            if not case.reached:
                out.append(f"{where}: the worker never reached that boundary")
                continue
            if case.outcome != self.baseline:
                out.append(f"{where}: ended {case.outcome}, not {self.baseline}")
            allowed = {case.step: 1} if case.point == "after_effect" else {}
            for name, n in case.extra.items():
                if n > allowed.get(name, 0):
                    out.append(f"{where}: {name!r} ran {n} more time(s) than without a crash")
        return out

    @property
    def double_effects(self) -> list[str]:
        """Every step that ran more often than in the baseline, case by case (the
        step in flight at an ``after_effect`` kill among them)."""
        return [
            f"killed {case.point} of attempt {case.attempt}: {name!r} ran {n} extra time(s)"
            for case in self.cases
            for name, n in case.extra.items()
            if n > 0
        ]

    def assert_exactly_once(self, *, idempotent: Iterable[str] = ()) -> None:
        """Raise AssertionError unless every effect ran once, but the in-flight
        repeats of the steps named ``idempotent`` (ones you made safe to run twice)."""
        safe = set(idempotent)
        problems = list(self.violations)
        for case in self.cases:
            for name, n in case.extra.items():
                in_flight = case.point == "after_effect" and name == case.step and n == 1
                if n > 0 and in_flight and name not in safe:
                    problems.append(
                        f"killed after the effect of attempt {case.attempt}, before its "
                        f"record: {name!r} ran twice (make it idempotent, then pass "
                        f"idempotent={{{name!r}}})"
                    )
        if problems:
            raise AssertionError("crash matrix:\n  " + "\n  ".join(problems))


def crash_matrix(
    wf: Workflow[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    backend: str,
    events: Sequence[tuple[str, Any]] = (),
    points: Sequence[Point] = POINTS,
    lease: float = 1.0,
    timeout: float = 120.0,
) -> CrashMatrix:
    """Run ``wf(**kwargs)`` killed at every boundary (see the module docstring).

    ``backend``: a store URL the worker processes share (not ``memory://``). ``wf``
    must be importable by module and name (not defined in ``__main__`` or a
    function). ``events`` are sent to each run right after it starts. ``lease``:
    the crashing workers' lease, which is how long the fresh worker waits.
    Call it plainly or ``await`` it (see ``_either``)."""
    if backend.startswith("memory:"):
        raise ConfigurationError(
            "crash_matrix() needs a store worker processes share, not memory://"
        )
    for point in points:
        if point not in POINTS:
            raise ValueError(f"unknown boundary {point!r}; expected one of {', '.join(POINTS)}")
    app = _app_spec(wf)
    return run_to_end(
        lambda: _matrix(wf, kwargs, app, backend, events, points, lease=lease, timeout=timeout)
    )


async def _matrix(
    wf: Workflow[Any],
    kwargs: dict[str, Any] | None,
    app: str,
    backend: str,
    events: Sequence[tuple[str, Any]],
    points: Sequence[Point],
    *,
    lease: float,
    timeout: float,
) -> CrashMatrix:
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="substantial-crash-") as scratch:
        pool = _Processes(Path(scratch), app, backend)
        conductor = Conductor(backend)
        conductor.register(wf)
        try:
            base = await _start(conductor, wf, kwargs, events, f"{tag}-base", f"crash-{tag}-base")
            pool.spawn([f"crash-{tag}-base"], crash=None, lease=lease)
            baseline = await _outcome(base, timeout, pool)
            pool.stop_all()
            steps = pool.effects().get(base.run_id, [])
            cases = [(k, p) for k in range(1, len(steps) + 1) for p in points]
            handles = []
            for i, (k, p) in enumerate(cases):
                queue = f"crash-{tag}-{i}"
                handles.append(await _start(conductor, wf, kwargs, events, f"{tag}-{k}-{p}", queue))
                pool.spawn([queue], crash=(k, p), lease=lease)
            reached = await asyncio.gather(*(pool.died(i + 1, timeout) for i in range(len(cases))))
            pool.spawn([f"crash-{tag}-{i}" for i in range(len(cases))], crash=None, lease=30.0)
            outcomes = await asyncio.gather(*(_outcome(h, timeout, pool) for h in handles))
        finally:
            pool.stop_all()
            await conductor.close()
        ran = pool.effects()
    base_count = Counter(steps)
    report = []
    for (k, p), h, out, ok in zip(cases, handles, outcomes, reached, strict=True):
        count = Counter(ran.get(h.run_id, []))
        extra = {name: n - base_count.get(name, 0) for name, n in count.items()}
        report.append(
            CrashCase(
                run_id=h.run_id,
                attempt=k,
                step=steps[k - 1],
                point=p,
                outcome=out,
                runs=dict(count),
                extra={n: e for n, e in extra.items() if e},
                reached=ok,
            )
        )
    return CrashMatrix(baseline=baseline, steps=steps, cases=report)


def _app_spec(wf: Workflow[Any]) -> str:
    """``module:attr`` a worker process imports ``wf`` by."""
    module = getattr(wf.fn, "__module__", None)
    mod = sys.modules.get(module or "")
    if module in (None, "__main__") or mod is None:
        raise ConfigurationError(
            f"crash_matrix(): workflow {wf.name!r} must live in an importable module "
            "(worker processes import it), not in __main__"
        )
    for attr, value in vars(mod).items():
        if value is wf:
            return f"{module}:{attr}"
    raise ConfigurationError(
        f"crash_matrix(): workflow {wf.name!r} is not a module-level name of {module}"
    )


async def _start(
    c: Conductor,
    wf: Workflow[Any],
    kwargs: dict[str, Any] | None,
    events: Sequence[tuple[str, Any]],
    run_id: str,
    queue: str,
) -> RunHandle[Any]:
    h = await c.start(wf, kwargs, run_id=run_id, queue=queue)
    for name, value in events:
        await h.send(name, value)
    return h


async def _outcome(h: RunHandle[Any], timeout: float, pool: _Processes) -> tuple[str, Any]:
    try:
        value = await h.result(timeout=timeout)
    except RunError as exc:
        return str(await h.status()), str(exc)
    except TimeoutError:
        raise AssertionError(
            f"crash matrix: run {h.run_id} did not end within {timeout}s\n{pool.logs()}"
        ) from None
    return "COMPLETED", value


class _Processes:
    """The matrix's worker processes and the effects file they all write."""

    def __init__(self, scratch: Path, app: str, backend: str) -> None:
        self._scratch = scratch
        self._app = app
        self._backend = backend
        self._effects = scratch / "effects.jsonl"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}

    def spawn(self, queues: list[str], *, crash: tuple[int, str] | None, lease: float) -> None:
        spec = {
            "app": self._app,
            "backend": self._backend,
            "queues": queues,
            "crash": crash,
            "effects": str(self._effects),
            "lease": lease,
        }
        err = (self._scratch / f"worker-{len(self._procs)}.err").open("wb")
        argv = [
            sys.executable,
            "-m",
            "substantial.testing._crash_worker",
            orjson.dumps(spec).decode(),
        ]
        self._procs.append(
            subprocess.Popen(
                argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        )
        err.close()

    async def died(self, index: int, timeout: float) -> bool:
        """Whether process ``index`` killed itself at its boundary in time (if not,
        it is killed here: its run may have ended without reaching it)."""
        proc = self._procs[index]
        try:
            code = await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False
        return code == -signal.SIGKILL

    def stop_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def effects(self) -> dict[str, list[str]]:
        """Step names run, per run id, in the order they ran."""
        out: dict[str, list[str]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self._effects.read_bytes().splitlines():
                rec = orjson.loads(line)
                out.setdefault(rec["run"], []).append(rec["step"])
        return out

    def logs(self) -> str:
        parts = []
        for path in sorted(self._scratch.glob("worker-*.err")):
            text = path.read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {path.name} ---\n{text[-2000:]}")
        return "\n".join(parts)
