"""Failover benchmark: how soon the runs of a SIGKILLed worker resume elsewhere.

    python bench/failover.py [--stores sqlite,fs,redis,postgres] [--lease 2] [--runs 20]

Guarantee 4 says a run whose worker died resumes on another worker within the
lease plus one poll interval. The tests check that it does (another worker
claims it, never before the lease expired, each step once); this script
measures how long it takes. For each store it starts two worker processes,
starts ``--runs`` runs of sleeping steps, waits for them to be under way,
SIGKILLs the worker holding the most runs and, for each run that worker held,
times the kill to that run's next step on the other worker. Prints a table and
writes bench/reports/failover.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from substantial import Conductor, Context, workflow

REPORTS = Path(__file__).resolve().parent / "reports"
URLS = {  # {tmp}: a fresh temp dir; {tag}: a fresh name
    "sqlite": "sqlite:///{tmp}/bench.db",
    "fs": "file://{tmp}/fs",
    "redis": "redis://127.0.0.1:6379/0?prefix={tag}",
    "postgres": "postgresql://postgres@127.0.0.1:5432/test?schema={tag}",
}
EFFECTS = os.environ.get("SUBSTANTIAL_BENCH_EFFECTS", "")


def effect(run_id: str, step: int) -> int:
    """One line per executed step: ``run_id step pid time`` (one O_APPEND write)."""
    line = f"{run_id} {step} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return step


@workflow(name="bench.failover")
async def paced(c: Context, n: int, pause: float) -> int:
    for i in range(n):
        await c.save(lambda i=i: effect(c.run_id, i))
        await c.sleep(pause)
    return n


async def serve(url: str, lease: float) -> None:
    async with Conductor(url) as conductor:
        conductor.register(paced)
        task = conductor.run(lease=lease, hot_wait=5.0)
        print("ready", flush=True)
        await task


def read_effects(path: Path) -> list[tuple[str, int, int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        rid, step, pid, t = line.split()
        out.append((rid, int(step), int(pid), float(t)))
    return out


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def spawn(url: str, lease: float, effects: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "SUBSTANTIAL_BENCH_EFFECTS": str(effects)}
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", url, "--lease", str(lease)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


async def one_store(store: str, lease: float, runs: int) -> dict[str, Any]:
    tag = f"bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="substantial-failover-") as tmp:
        url = URLS[store].format(tmp=tmp, tag=tag)
        effects = Path(tmp) / "effects.log"
        async with Conductor(url) as client:
            procs = [spawn(url, lease, effects) for _ in range(2)]
            try:
                for p in procs:
                    assert p.stdout is not None
                    await asyncio.to_thread(p.stdout.readline)  # "ready"
                ids = [f"f{i:03}" for i in range(runs)]
                for rid in ids:
                    await client.start("bench.failover", {"n": 40, "pause": 0.1}, run_id=rid)
                await wait_until(
                    lambda: len({e[0] for e in read_effects(effects)}) == runs, 60, "runs started"
                )
                held = Counter(
                    int(r.lease_owner.split(":")[-2])
                    for r in await client.backend.list_runs()
                    if not r.status.is_terminal and r.lease_owner
                )
                victim = next(p for p in procs if p.pid == held.most_common(1)[0][0])
                killed_at = time.time()
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                orphans = {
                    r.run_id
                    for r in await client.backend.list_runs()
                    if r.lease_owner and f":{victim.pid}:" in r.lease_owner
                    if not r.status.is_terminal
                }

                def resumed() -> dict[str, float]:
                    first: dict[str, float] = {}
                    for rid, _, pid, t in read_effects(effects):
                        if rid in orphans and pid != victim.pid and t > killed_at:
                            first.setdefault(rid, t - killed_at)
                    return first

                await wait_until(lambda: len(resumed()) == len(orphans), 120, "resumed")
                delays = sorted(resumed().values())
                poll = client.backend.poll_interval or 0.0
                drop = getattr(client.backend, "drop_everything", None)
                if drop is not None:
                    await drop()
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                    p.wait()
    return {
        "store": store,
        "lease": lease,
        "poll": poll,
        "orphans": len(delays),
        "min": delays[0] if delays else float("nan"),
        "median": statistics.median(delays) if delays else float("nan"),
        "max": delays[-1] if delays else float("nan"),
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = "| store | lease s | poll s | orphaned runs | resumed after min / median / max s |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['store']} | ERR | | | {r['error']} |")
            continue
        lines.append(
            f"| {r['store']} | {r['lease']:g} | {r['poll']:g} | {r['orphans']} | "
            f"{r['min']:.2f} / {r['median']:.2f} / {r['max']:.2f} |"
        )
    return lines


async def main(args: argparse.Namespace) -> None:
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    rows: list[dict[str, Any]] = []
    for store in stores:
        print(f"{store}: running...", file=sys.stderr, flush=True)
        try:
            rows.append(await one_store(store, args.lease, args.runs))
        except Exception as exc:  # one store failing must not hide the others
            rows.append({"store": store, "error": f"{type(exc).__name__}: {exc}"})
    lines = table(rows)
    print("\n".join(lines))
    REPORTS.mkdir(parents=True, exist_ok=True)
    md = ["# Failover: resume after a SIGKILLed worker", "", *lines, ""]
    md.append("Time from SIGKILL to each orphaned run's next step on the surviving worker.")
    md.append("Guarantee 4 bounds it by about lease + one poll interval.")
    (REPORTS / "failover.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", default=",".join(URLS))
    ap.add_argument("--lease", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    parsed = ap.parse_args()
    if parsed.worker:
        asyncio.run(serve(parsed.worker, parsed.lease))
    else:
        asyncio.run(main(parsed))
