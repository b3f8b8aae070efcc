"""Worker subprocesses, signals, and the exactly-once check of recorded side effects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from substantial.backends import Backend

ROOT = Path(__file__).resolve().parents[2]  # the repository root (has tests/ and src/)


# -- worker processes -----------------------------------------------------------------


@dataclass
class WorkerProc:
    """One ``tests.integration.worker_proc`` subprocess (stdout/stderr go to files)."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    name: str
    killed: bool = False
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while "ready" not in self.stdout():
            if not self.alive():
                raise AssertionError(
                    f"worker {self.name} (pid {self.pid}) exited with {self.proc.returncode} "
                    f"before it was ready:\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker {self.name} not ready in {timeout}s:\n{self.stderr()}"
                )
            await asyncio.sleep(0.02)

    def kill(self) -> float:
        """SIGKILL and reap; returns the time.time() just before the signal."""
        t = time.time()
        if self.alive():
            if self.stopped:
                os.kill(self.pid, signal.SIGCONT)  # (SIGKILL works on stopped ones anyway)
            self.proc.send_signal(signal.SIGKILL)
            self.killed = True
        self.proc.wait()
        return t

    def stop(self) -> float:
        """SIGSTOP (freeze); returns the time of the signal."""
        t = time.time()
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True
        return t

    def cont(self) -> float:
        t = time.time()
        self.proc.send_signal(signal.SIGCONT)
        return t


class Workers:
    """Spawns workers for one test and kills whatever is left at the end."""

    def __init__(self, tmp: Path, url: str, effects: Path) -> None:
        self.tmp = tmp
        self.url = url
        self.effects = effects
        self.all: list[WorkerProc] = []

    def spawn(
        self,
        *,
        lease: float = 1.0,
        concurrency: int = 64,
        hot_wait: float = 5.0,
        url: str | None = None,
        env: Mapping[str, str] | None = None,
        ticker: float | None = None,
        queues: tuple[str, ...] = (),
    ) -> WorkerProc:
        n = len(self.all)
        out, err = self.tmp / f"worker-{n}.out", self.tmp / f"worker-{n}.err"
        cmd = [
            sys.executable, "-m", "tests.integration.worker_proc", url or self.url,
            str(self.effects), "--lease", str(lease), "--concurrency", str(concurrency),
            "--hot-wait", str(hot_wait),
            *([] if ticker is None else ["--ticker", str(ticker)]),
            *(arg for q in queues for arg in ("--queue", q)),
        ]  # fmt: skip
        full_env = {**os.environ, **(env or {})}  # CI and SUBSTANTIAL_* pass through
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "src"), full_env.get("PYTHONPATH")) if p
        )
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=o, stderr=e
            )
        w = WorkerProc(proc=proc, out=out, err=err, name=f"w{n}")
        self.all.append(w)
        return w

    async def start(self, count: int = 1, **options: Any) -> list[WorkerProc]:
        ws = [self.spawn(**options) for _ in range(count)]
        for w in ws:
            await w.wait_ready()
        return ws

    @property
    def killed_pids(self) -> set[int]:
        return {w.pid for w in self.all if w.killed}

    @property
    def stopped_pids(self) -> set[int]:
        return {w.pid for w in self.all if w.stopped and not w.killed}

    def shutdown(self) -> None:
        for w in self.all:
            if w.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGCONT)
                    w.proc.kill()
            w.proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name} pid {w.pid} stderr ---\n{w.stderr()}" for w in self.all)


# -- side effects ----------------------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    run_id: str
    step: int
    pid: int
    t: float
    index: int  # line number in the file (the order effects happened in)


def read_effects(path: Path) -> list[Effect]:
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        parts = line.split()
        if len(parts) not in (3, 4):
            raise AssertionError(f"malformed effect line {i}: {line!r}")
        t = float(parts[3]) if len(parts) == 4 else 0.0
        out.append(Effect(parts[0], int(parts[1]), int(parts[2]), t, i))
    return out


@dataclass
class EffectReport:
    violations: list[str] = field(default_factory=list)
    excused: list[str] = field(default_factory=list)  # legitimate re-executions

    def __bool__(self) -> bool:
        return not self.violations


def check_effects(
    effects: Iterable[Effect],
    *,
    expected: Mapping[str, int] | None = None,
    killed: Iterable[int] = (),
    stopped: Iterable[int] = (),
    outage: tuple[float, float] | None = None,
) -> EffectReport:
    """Check that every step's side effect happened exactly once, but for the one
    legitimate exception.

    A save may run again only if the process that ran it lost the run before
    persisting it. So in the executions of one (run_id, step), every one but a
    single execution must be *excused*:

    * by a SIGKILLed pid (``killed``): it happened before another execution of
      that step, and it is the last effect that pid wrote for that run (it died
      in that step);
    * by a SIGSTOPped-then-fenced pid (``stopped``): it is the last effect that
      pid wrote for that run (it was frozen inside that step; after waking up its
      writes were rejected and it abandoned the run). Its effect may come before
      or after the execution of the worker that took over;
    * during a store outage (``outage`` = (start, end) epoch seconds): it happened
      in that window before another execution of that step (its worker could not
      store the result and gave the run up).

    Everything else is a violation. ``expected`` (run_id -> number of steps)
    also requires every step 0..n-1 of every run to be present, and nothing else.
    """
    killed, stopped = set(killed), set(stopped)
    effects = list(effects)
    report = EffectReport()
    last_of: dict[tuple[str, int], int] = {}  # (run, pid) -> index of its last effect
    groups: dict[tuple[str, int], list[Effect]] = defaultdict(list)
    for e in effects:
        last_of[(e.run_id, e.pid)] = max(last_of.get((e.run_id, e.pid), -1), e.index)
        groups[(e.run_id, e.step)].append(e)
    for (run_id, step), execs in sorted(groups.items()):
        if len(execs) == 1:
            continue
        execs.sort(key=lambda e: e.index)
        unexcused = []
        for pos, e in enumerate(execs):
            last = last_of[(run_id, e.pid)] == e.index
            if e.pid in killed and last and pos < len(execs) - 1:
                report.excused.append(f"{run_id} step {step}: pid {e.pid} was killed in it")
            elif e.pid in stopped and last:
                report.excused.append(f"{run_id} step {step}: pid {e.pid} was fenced in it")
            elif outage and outage[0] <= e.t <= outage[1] and pos < len(execs) - 1:
                report.excused.append(f"{run_id} step {step}: pid {e.pid} ran it in the outage")
            else:
                unexcused.append(e)
        if len(unexcused) > 1:
            pids = [f"pid {e.pid} (line {e.index}, t={e.t:.3f})" for e in execs]
            report.violations.append(
                f"{run_id} step {step} ran {len(execs)} times: {', '.join(pids)}; "
                f"killed={sorted(killed)} stopped={sorted(stopped)}"
            )
    if expected is not None:
        for run_id, n in expected.items():
            seen = {s for (r, s) in groups if r == run_id}
            missing = sorted(set(range(n)) - seen)
            extra = sorted(seen - set(range(n)))
            if missing:
                report.violations.append(f"{run_id}: steps {missing} never ran")
            if extra:
                report.violations.append(f"{run_id}: unexpected steps {extra}")
        strangers = sorted({r for (r, _) in groups} - set(expected))
        if strangers:
            report.violations.append(f"effects of unknown runs: {strangers[:5]}")
    return report


def assert_exactly_once(
    path: Path,
    *,
    expected: Mapping[str, int],
    killed: Iterable[int] = (),
    stopped: Iterable[int] = (),
    context: str = "",
) -> EffectReport:
    report = check_effects(read_effects(path), expected=expected, killed=killed, stopped=stopped)
    if report.violations:
        shown = "\n".join(report.violations[:30])
        more = len(report.violations) - 30
        tail = f"\n... and {more} more" if more > 0 else ""
        raise AssertionError(f"exactly-once violated:\n{shown}{tail}\n{context}")
    return report


# -- store-side checks ------------------------------------------------------------------


async def read_log(backend: Backend, run_id: str) -> list[dict[str, Any]]:
    snap = await backend.read(run_id)
    assert snap is not None, f"run {run_id} is missing from the store"
    return [orjson.loads(data) for data in snap.log]


async def check_log_once(backend: Backend, run_id: str, saves: int) -> list[str]:
    """The run's log records each save once (one ``call`` per seq), each timer armed
    at most once, and exactly one end record. Returns problems (empty = fine)."""
    recs = await read_log(backend, run_id)
    problems = []
    calls: dict[int, int] = defaultdict(int)
    arms: dict[int, int] = defaultdict(int)
    for r in recs:
        if r["k"] == "call":
            calls[r["s"]] += 1
        elif r["k"] == "arm":
            arms[r["s"]] += 1
    dup_calls = {s: n for s, n in calls.items() if n != 1}
    dup_arms = {s: n for s, n in arms.items() if n != 1}
    ends = sum(1 for r in recs if r["k"] == "end")
    if dup_calls:
        problems.append(f"{run_id}: calls recorded more than once: {dup_calls}")
    if dup_arms:
        problems.append(f"{run_id}: timers armed more than once: {dup_arms}")
    if len(calls) != saves:
        problems.append(f"{run_id}: {len(calls)} calls in the log, expected {saves}")
    if ends != 1:
        problems.append(f"{run_id}: {ends} end records")
    return problems


async def wait_all_terminal(
    backend: Backend,
    run_ids: Iterable[str],
    *,
    timeout: float,
    every: float = 0.25,
    on_timeout: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Poll the store until every run is terminal; returns run_id -> RunRecord."""
    wanted = set(run_ids)
    deadline = time.monotonic() + timeout
    while True:
        runs = {r.run_id: r for r in await backend.list_runs() if r.run_id in wanted}
        if len(runs) == len(wanted) and all(r.status.is_terminal for r in runs.values()):
            return runs
        if time.monotonic() > deadline:
            pending = sorted(r for r in wanted if r not in runs or not runs[r].status.is_terminal)
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(
                f"{len(pending)} of {len(wanted)} runs not finished after {timeout}s, "
                f"e.g. {[(r, runs[r].status if r in runs else None) for r in pending[:5]]}\n"
                f"{extra}"
            )
        await asyncio.sleep(every)


async def wait_for(
    check: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float,
    every: float = 0.02,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout}s")
        await asyncio.sleep(every)
