"""The workloads of the peers bench, written once for every system.

Each system's module (``peer_substantial.py``, ``peer_dbos.py``,
``peer_absurd.py``) defines the same four workflows in its own library and a
``Peer`` subclass that starts them, waits for their results and serves them
in a worker process; this module times them the same way for all three, so
that a difference in the figures is a difference of the libraries, not of
the measuring code. It needs only the standard library and asyncpg, so that
it imports in the project's virtualenv and in the peers' one alike.

The workflows, by name:

- ``steps(n)``: ``n`` sequential steps whose function returns its index;
- ``wait_go()``: returns the value of the message ``go`` it waits for;
- ``paced(n, effects)``: steps 1 to ``n``, each sleeping 30 ms and then appending
  one line ``step pid time`` to the file ``effects`` (the effect that must not repeat);
- ``nap(seconds)``: one durable sleep, then returns.

A module is run in one of three modes (``python peer_X.py MODE ...``):
``local`` (W1, W2, W6: client and worker in this process), ``remote`` (W3,
W4, W5, W7: this process is only a client; the workers are subprocesses in
``worker`` mode). Each mode writes one JSON document to ``--out``.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import itertools
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg

PAYLOAD = b'{"k":"call","s":1,"p":"save","at":"run.py:42","v":1}'  # as bench/run.py
STEP_PAUSE = 0.03  # seconds each paced step sleeps before its effect
KILL_AFTER = 0.01  # seconds after step 10's effect is seen that its worker is killed


@dataclass(frozen=True)
class Config:
    """Sizes of the workloads; ``QUICK`` overrides them for a smoke run."""

    steps: int = 1000  # W2: steps of the sequential run
    seq_reps: int = 5  # W2: rounds of (raw commits, one sequential run)
    raw: int = 500  # W2: INSERT+COMMIT samples per round
    fan: tuple[tuple[int, int], ...] = ((200, 10), (1000, 1))  # W1: (runs, steps)
    long_steps: int = 10_000  # W6: the long run
    reps: int = 50  # W3, W4: samples
    warmup: int = 3  # W3, W4: unmeasured samples first
    budget: float = 30.0  # W3, W4: seconds after which sampling stops (with >= min_reps)
    min_reps: int = 10
    paced: int = 20  # W5: steps of the killed run
    kill_at: int = 10  # W5: the worker is killed after this step's effect
    lease: float = 5.0  # W5: lease (claim timeout) where the system has one
    naps: int = 10_000  # W7: sleeping runs
    nap_s: float = 3600.0
    settle: float = 30.0  # W7: idle seconds before the window (see w7_idle)
    window: float = 60.0  # W7: the measured idle window, in slices of
    slice: float = 10.0
    timeout: float = 600.0  # per phase


QUICK = {
    "steps": 100, "seq_reps": 1, "raw": 100, "fan": ((20, 10), (100, 1)), "long_steps": 1000,
    "reps": 10, "warmup": 2, "budget": 10.0, "min_reps": 5, "naps": 300, "settle": 12.0,
    "window": 12.0, "slice": 3.0, "timeout": 180.0,
}  # fmt: skip


def config(quick: bool) -> Config:
    return replace(Config(), **QUICK) if quick else Config()  # type: ignore[arg-type]


# -- statistics -----------------------------------------------------------------------
def p50_p95(samples: list[float]) -> tuple[float, float]:
    """Median and nearest-rank 95th percentile."""
    s = sorted(samples)
    return statistics.median(s), s[max(0, math.ceil(0.95 * len(s)) - 1)]


def expect(got: Any, want: Any) -> None:
    if got != want:  # not assert: must hold under python -O too
        raise AssertionError(f"expected {want!r}, got {got!r}")


# -- the system under test --------------------------------------------------------------
class Peer(abc.ABC):
    """One system's side of the workloads. A handle is whatever ``start`` returns."""

    system: str = ""
    store: str = "postgres"

    def __init__(self, args: argparse.Namespace) -> None:
        self.dsn: str = args.dsn
        self.url: str = args.url or args.dsn

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Package versions, for the report."""

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """The library settings this side runs with (defaults named as such)."""

    @abc.abstractmethod
    async def open(self, *, local: bool) -> None:
        """Connect; with ``local`` also start a worker in this process."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def start(self, workflow: str, *args: Any) -> Any:
        """Start one run of ``workflow`` (one of the four names) with ``args``."""

    @abc.abstractmethod
    async def result(self, handle: Any) -> Any: ...

    @abc.abstractmethod
    async def send(self, handle: Any, topic: str, value: Any) -> None: ...

    @abc.abstractmethod
    async def waiting(self, handle: Any) -> bool:
        """True once the run is parked in its receive (as far as the system tells)."""

    async def raw_sampler(self, n: int) -> tuple[Sampler, Callable[[], Awaitable[None]]]:
        """The store's bare commit for W2's ratio (PostgreSQL unless overridden)."""
        return await pg_raw_sampler(self.dsn, n)

    @abc.abstractmethod
    def asleep_sql(self) -> str:
        """SQL counting the runs parked in their durable sleep (W7 readiness)."""

    @abc.abstractmethod
    async def serve(self, lease: float | None, ready: Callable[[], None]) -> None:
        """Worker mode: serve the four workflows until killed; ``ready()`` once serving."""


# -- shared helpers ----------------------------------------------------------------------
def effect(path: str, step: int) -> int:
    """One line ``step pid unix-time`` appended with one O_APPEND write (W5's effect)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{step} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)
    return step


def read_effects(path: Path) -> list[tuple[int, int, float]]:
    if not path.exists():
        return []
    lines = (ln.split() for ln in path.read_text().splitlines())
    return [(int(s), int(p), float(t)) for s, p, t in lines]


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.005
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


Sampler = Callable[[], Awaitable[float]]  # one sample of the bare commit, in ms


async def pg_raw_sampler(dsn: str, n: int) -> tuple[Sampler, Callable[[], Awaitable[None]]]:
    """W2's reference: median ms of ``n`` autocommit single-row INSERTs (asyncpg,
    prepared, after 20 unmeasured), exactly as bench/run.py measures PostgreSQL.
    Returns the sampler and its closer."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE SCHEMA IF NOT EXISTS peers_raw")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS peers_raw.t (id bigserial PRIMARY KEY, data bytea)"
    )
    stmt = await conn.prepare("INSERT INTO peers_raw.t (data) VALUES ($1)")

    async def sample() -> float:
        times = []
        for _ in range(n + 20):
            t0 = time.perf_counter()
            await stmt.fetch(PAYLOAD)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[20:]) * 1e3

    return sample, conn.close


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def xacts(dsn: str) -> int:
    """Committed + rolled-back transactions of the bench database so far, read
    from another database (``postgres``) so the reading does not count."""
    dbname = dsn.rsplit("/", 1)[1].split("?")[0]
    conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        value = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", dbname
        )
        return int(value)
    finally:
        await conn.close()


class Worker:
    """A worker subprocess (this module in ``worker`` mode), its stderr in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.ready_s = float("nan")

    @classmethod
    async def spawn(cls, args: argparse.Namespace, lease: float | None, log: Path) -> Worker:
        argv = [sys.executable, args.script, "worker", "--dsn", args.dsn]
        if args.url:
            argv += ["--url", args.url]
        if lease is not None:
            argv += ["--lease", str(lease)]
        t0 = time.perf_counter()
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=err
            )
        worker = cls(proc, log)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(60):
                while (line := await proc.stdout.readline()) != b"ready\n":
                    if not line:
                        raise RuntimeError(f"worker exited: {worker.tail()}")
        except BaseException:
            await worker.kill()
            raise
        worker.ready_s = time.perf_counter() - t0
        return worker

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                await self.kill()


# -- local phases: client and worker in one process ------------------------------------------
async def one_run(peer: Peer, n: int) -> float:
    t0 = time.perf_counter()
    expect(await peer.result(await peer.start("steps", n)), n)
    return time.perf_counter() - t0


async def w2_sequential(peer: Peer, cfg: Config) -> dict[str, Any]:
    """W2: rounds of (raw commits, one ``steps(cfg.steps)`` run), after one unmeasured
    round of a tenth of the size; the ratio is the median of the rounds' ratios."""
    sample, close = await peer.raw_sampler(cfg.raw)
    try:
        await sample()
        await one_run(peer, max(1, cfg.steps // 10))
        raws, runs = [], []
        for _ in range(cfg.seq_reps):
            raws.append(await sample())
            runs.append(await one_run(peer, cfg.steps))
    finally:
        await close()
    ratios = [t * 1e3 / cfg.steps / r for t, r in zip(runs, raws, strict=True)]
    total = statistics.median(runs)
    return {"w2_run_s": total, "w2_ms_per_step": total * 1e3 / cfg.steps,
            "w2_raw_ms": statistics.median(raws), "w2_ratio": statistics.median(ratios),
            "w2_runs_s": runs}  # fmt: skip


async def w1_fanout(peer: Peer, runs: int, steps: int) -> dict[str, Any]:
    """W1: ``runs`` runs of ``steps`` steps started at once; first start to last result."""
    t0 = time.perf_counter()
    handles = await asyncio.gather(*(peer.start("steps", steps) for _ in range(runs)))
    expect(await asyncio.gather(*(peer.result(h) for h in handles)), [steps] * runs)
    total = time.perf_counter() - t0
    key = f"w1_{runs}x{steps}"
    return {f"{key}_s": total, f"{key}_wf_per_s": runs / total}


async def w6_long(peer: Peer, cfg: Config, short_s: float | None) -> dict[str, Any]:
    """W6: one ``steps(cfg.long_steps)`` run against W2's median ``steps(cfg.steps)``."""
    t = await one_run(peer, cfg.long_steps)
    short = short_s if short_s is not None else await one_run(peer, cfg.steps)
    return {"w6_long_s": t, "w6_short_s": short, "w6_ratio": t / short}


# -- remote phases: this process is a client, the workers are subprocesses --------------------
async def sampled(cfg: Config, once: Callable[[], Awaitable[float]]) -> list[float]:
    """``cfg.reps`` samples after ``cfg.warmup`` unmeasured ones, stopping early once
    ``cfg.budget`` seconds have passed and ``cfg.min_reps`` samples are in."""
    for _ in range(cfg.warmup):
        await once()
    out: list[float] = []
    t0 = time.monotonic()
    while len(out) < cfg.reps:
        out.append(await once())
        if time.monotonic() - t0 > cfg.budget and len(out) >= cfg.min_reps:
            break
    return out


def latency(key: str, samples: list[float]) -> dict[str, Any]:
    p50, p95 = p50_p95(samples)
    return {f"{key}_p50_ms": p50 * 1e3, f"{key}_p95_ms": p95 * 1e3, f"{key}_n": len(samples)}


async def w3_start_result(peer: Peer, cfg: Config) -> dict[str, Any]:
    """W3: ``start(steps(1))`` to its result, one at a time."""

    async def once() -> float:
        return await one_run(peer, 1)

    return latency("w3", await sampled(cfg, once))


async def w4_send_result(peer: Peer, cfg: Config) -> dict[str, Any]:
    """W4: a run parked in ``receive("go")``; ``send("go")`` to its result."""
    counter = iter(range(1_000_000))
    calls: list[float] = []  # how long send() itself took, of each sample

    async def once() -> float:
        value = next(counter)
        handle = await peer.start("wait_go")
        await wait_until(lambda: peer.waiting(handle), 60, "the run to wait")
        await asyncio.sleep(0.05)  # let it reach (and park in) its receive
        t0 = time.perf_counter()
        await peer.send(handle, "go", value)
        calls.append(time.perf_counter() - t0)
        expect(await peer.result(handle), value)
        return time.perf_counter() - t0

    out = latency("w4", await sampled(cfg, once))
    out["w4_send_call_p50_ms"] = statistics.median(calls[cfg.warmup :]) * 1e3
    return out


async def w5_kill(peer: Peer, args: argparse.Namespace, cfg: Config, tmp: Path) -> dict[str, Any]:
    """W5: SIGKILL the worker right after step ``kill_at`` of ``paced`` took effect
    (its next step is then in its 30 ms pause, before its effect), start a new
    worker at once, and time the kill to the new worker's first step, to the last
    step and to the result seen by this client; count the steps that took effect twice."""
    effects = tmp / "effects.txt"
    a = await Worker.spawn(args, cfg.lease, tmp / "w5a.log")
    try:
        handle = await peer.start("paced", cfg.paced, str(effects))

        async def reached() -> bool:
            return any(step >= cfg.kill_at for step, _, _ in read_effects(effects))

        await wait_until(reached, 60, f"step {cfg.kill_at}", every=0.001)
        await asyncio.sleep(KILL_AFTER)
        killed = time.time()
    finally:
        await a.kill()
    b = await Worker.spawn(args, cfg.lease, tmp / "w5b.log")
    try:
        expect(await peer.result(handle), cfg.paced)
        done_s = time.time() - killed
    finally:
        await b.kill()
    seen = read_effects(effects)
    expect(sorted({s for s, _, _ in seen}), list(range(1, cfg.paced + 1)))
    return {"w5_done_s": done_s,
            "w5_resume_s": min(t for _, p, t in seen if p == b.pid) - killed,
            "w5_last_step_s": max(t for _, _, t in seen) - killed,
            "w5_new_worker_ready_s": b.ready_s,
            "w5_reexecuted": len(seen) - cfg.paced,
            "w5_steps_before_kill": sum(1 for _, p, _ in seen if p == a.pid)}  # fmt: skip


async def w7_idle(peer: Peer, args: argparse.Namespace, cfg: Config, tmp: Path) -> dict[str, Any]:
    """W7: ``cfg.naps`` runs asleep for an hour on one worker; the database's
    transactions per minute over an idle window, and the worker's RSS.

    pg_stat_database lags: a backend hands its counts over at most once a second
    when it goes idle, and one that fails to get the stats lock (a "partial
    flush") keeps them for up to a minute. Seen here: transactions of the start
    burst showing up 15 to 35 s after the burst, while the server's statement log
    showed only the worker's one poll per second. So the window starts
    ``cfg.settle`` s after every run is asleep, is read in slices, and the figure
    is the median slice's rate (the mean over the window is reported beside it)."""
    worker = await Worker.spawn(args, None, tmp / "w7.log")
    try:
        rss_before = rss_mb(worker.pid)
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(200)

        async def start_one() -> None:
            async with sem:
                await peer.start("nap", cfg.nap_s)

        await asyncio.gather(*(start_one() for _ in range(cfg.naps)))
        started_s = time.perf_counter() - t0
        await peer.close()  # the client is gone: only the worker touches the database now
        conn = await asyncpg.connect(args.dsn)
        try:

            async def all_asleep() -> bool:
                return int(await conn.fetchval(peer.asleep_sql())) >= cfg.naps

            await wait_until(all_asleep, cfg.timeout, "every run asleep", every=1.0)
        finally:
            await conn.close()
        asleep_s = time.perf_counter() - t0
        await asyncio.sleep(cfg.settle)
        marks = [(time.perf_counter(), await xacts(args.dsn))]
        for _ in range(max(1, round(cfg.window / cfg.slice))):
            await asyncio.sleep(cfg.slice)
            marks.append((time.perf_counter(), await xacts(args.dsn)))
        rss = rss_mb(worker.pid)
        if worker.proc.returncode is not None:
            raise RuntimeError(f"worker died: {worker.tail()}")
    finally:
        await worker.stop()
    rates = [(x1 - x0) / (t1 - t0) for (t0, x0), (t1, x1) in itertools.pairwise(marks)]
    (w0, x0), (w1, x1) = marks[0], marks[-1]
    per_s = statistics.median(rates)
    return {"w7_runs": cfg.naps, "w7_started_s": started_s, "w7_asleep_s": asleep_s,
            "w7_xact_per_min": per_s * 60, "w7_xact_per_s": per_s,
            "w7_xact_per_min_mean": (x1 - x0) / (w1 - w0) * 60, "w7_slices_per_s": rates,
            "w7_window_s": w1 - w0, "w7_rss_mb": rss, "w7_rss_before_mb": rss_before}  # fmt: skip


# -- running the phases ---------------------------------------------------------------------
class Phases:
    """Runs phases one after another; a phase that fails or times out is noted
    in ``errors`` (with its traceback on stderr) and the next one still runs."""

    def __init__(self, system: str, cfg: Config, only: set[str] | None) -> None:
        self.system, self.cfg, self.only = system, cfg, only
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def wanted(self, phase: str) -> bool:
        return self.only is None or phase in self.only

    async def run(
        self, phase: str, make: Callable[[], Awaitable[dict[str, Any]]], label: str = ""
    ) -> None:
        if not self.wanted(phase):
            return
        label = label or phase
        print(f"  {self.system} {label}...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                self.results.update(await make())
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.errors[label] = f"{type(exc).__name__}: {exc}".strip()
        self.results[f"{label}_phase_s"] = time.perf_counter() - t0


async def run_local(peer: Peer, args: argparse.Namespace, cfg: Config) -> Phases:
    ph = Phases(peer.system, cfg, args.phases)
    await peer.open(local=True)
    try:
        await ph.run("w2", lambda: w2_sequential(peer, cfg))
        await one_run(peer, 2)  # warm-up for the fan-outs, unmeasured
        for runs, steps in cfg.fan:
            await ph.run("w1", lambda r=runs, s=steps: w1_fanout(peer, r, s), f"w1_{runs}x{steps}")
        short = ph.results.get("w2_run_s")
        await ph.run("w6", lambda: w6_long(peer, cfg, short))
    finally:
        await peer.close()
    return ph


async def run_remote(peer: Peer, args: argparse.Namespace, cfg: Config) -> Phases:
    ph = Phases(peer.system, cfg, args.phases)
    with tempfile.TemporaryDirectory(prefix="peers-") as tmpdir:
        tmp = Path(tmpdir)
        await peer.open(local=False)
        try:
            if ph.wanted("w3") or ph.wanted("w4"):
                try:
                    worker = await Worker.spawn(args, None, tmp / "w34.log")
                except Exception as exc:
                    ph.errors["w3"] = ph.errors["w4"] = f"{type(exc).__name__}: {exc}"
                else:
                    try:
                        await ph.run("w3", lambda: w3_start_result(peer, cfg))
                        await ph.run("w4", lambda: w4_send_result(peer, cfg))
                    finally:
                        await worker.stop()
            await ph.run("w5", lambda: w5_kill(peer, args, cfg, tmp))
            await ph.run("w7", lambda: w7_idle(peer, args, cfg, tmp))
        finally:
            await peer.close()
        dump_logs(peer.system, tmp)
    return ph


def dump_logs(system: str, tmp: Path) -> None:
    """The workers' own complaints (their stderr), for the record."""
    for log in sorted(tmp.glob("*.log")):
        text = log.read_text(errors="replace").strip()
        if text:
            print(f"  [{system} {log.name}] {text[-2000:]}", file=sys.stderr)


def main(make_peer: Callable[[argparse.Namespace], Peer]) -> None:
    """The command line of a system's module (see the module docstring)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["local", "remote", "worker"])
    ap.add_argument("--dsn", required=True, help="postgresql://... of the bench database")
    ap.add_argument("--url", default="", help="the store URL, if not the DSN (substantial)")
    ap.add_argument("--lease", type=float, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phases", default="", help="comma-separated subset of w1..w7")
    ap.add_argument("--out", default="", help="JSON output file (local, remote)")
    args = ap.parse_args()
    args.script = str(Path(sys.argv[0]).resolve())
    args.phases = {p for p in args.phases.split(",") if p} or None
    peer = make_peer(args)
    if args.mode == "worker":
        asyncio.run(peer.serve(args.lease, lambda: print("ready", flush=True)))
        return
    cfg = config(args.quick)
    runner = run_local if args.mode == "local" else run_remote
    ph = asyncio.run(runner(peer, args, cfg))
    doc = {"system": peer.system, "store": peer.store, "mode": args.mode,
           "versions": peer.versions(), "settings": peer.settings(), "config": asdict(cfg),
           "results": ph.results, "errors": ph.errors}  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
