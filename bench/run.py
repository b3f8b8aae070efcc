"""Substantial benchmark: throughput and latency per store, with an in-process worker.

    python bench/run.py [--stores memory,sqlite,fs,redis,postgres] [--quick] [--out DIR]

Prints a plain-text table and writes bench/reports/latest.{md,json} (or DIR/...).
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _machine import machine  # bench/ is the script's own directory on sys.path

from substantial import Conductor, Context, RunStatus, workflow

REPORTS = Path(__file__).resolve().parent / "reports"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
URLS = {  # {tmp}: a fresh temp dir (absolute, hence sqlite:////...); {tag}: a fresh name
    "memory": "memory://",
    "sqlite": "sqlite:///{tmp}/bench.db",
    "fs": "file://{tmp}/fs",
    "redis": "redis://127.0.0.1:6379/0?prefix={tag}",
    "postgres": PG_DSN + "?schema={tag}",
}
Once = Callable[[Conductor, int], Awaitable[float]]  # one timed repetition, in seconds
PAYLOAD = b'{"k":"call","s":1,"p":"save","at":"run.py:42","v":1}'  # a typical step record


@workflow(name="bench.steps")
async def steps(c: Context, n: int) -> int:
    """Steps whose function is ``async def``: they run on the event loop."""
    for i in range(n):

        async def step(i: int = i) -> int:
            return i

        await c.save(step)
    return n


@workflow(name="bench.sync_steps")
async def sync_steps(c: Context, n: int) -> int:
    """Steps whose function is plain: each runs in a thread (so it may block)."""
    for i in range(n):
        await c.save(lambda i=i: i)
    return n


@workflow(name="bench.wait")
async def wait_go(c: Context) -> Any:
    return await c.receive("go")


@dataclass(frozen=True)
class Config:
    steps: int = 1000
    seq_reps: int = 5  # sequential runs of each kind, interleaved with raw commit samples
    runs: int = 200
    run_steps: int = 10
    reps: int = 50
    warmup: int = 5
    raw: int = 500
    concurrency: int = 64
    hot_wait: float = 5.0
    timeout: float = 300.0  # per phase


QUICK = {"steps": 100, "seq_reps": 1, "runs": 20, "reps": 10, "warmup": 2, "raw": 100,
         "timeout": 60.0}  # fmt: skip


# -- phases: each returns figures to merge into the store's row --------------------
def expect(got: Any, want: Any) -> None:
    if got != want:  # not assert: the awaits inside must run under python -O too
        raise AssertionError(f"expected {want!r}, got {got!r}")


Raw = Callable[[], Awaitable[float]]  # one sample of the store's bare commit, in ms


async def one_run(cond: Conductor, wf: Any, n: int) -> float:
    t0 = time.perf_counter()
    expect(await (await cond.start(wf, {"n": n})).result(), n)
    return time.perf_counter() - t0


async def sequential(cond: Conductor, cfg: Config, raw: Raw | None) -> dict[str, float]:
    """``seq_reps`` rounds of: raw commits (if the store has them), a run of async
    steps, a run of plain steps, after one unmeasured round of a tenth of the size.
    Interleaved, so a noisy minute on a shared machine
    moves both sides of the ratio: the ratio is the median of the rounds' ratios,
    the other figures the medians of their samples."""
    raws, seqs, syncs = [], [], []
    if raw is not None:  # warm-up, unmeasured: statements prepared, caches filled
        await raw()
    await one_run(cond, steps, cfg.steps // 10)
    await one_run(cond, sync_steps, cfg.steps // 10)
    for _ in range(cfg.seq_reps):
        if raw is not None:
            raws.append(await raw())
        seqs.append(await one_run(cond, steps, cfg.steps))
        syncs.append(await one_run(cond, sync_steps, cfg.steps))
    total = statistics.median(seqs)
    out = {"seq_s": total, "seq_steps_per_s": cfg.steps / total,
           "seq_ms_per_step": total * 1e3 / cfg.steps,
           "sync_ms_per_step": statistics.median(syncs) * 1e3 / cfg.steps}  # fmt: skip
    if raws:
        out["raw_ms"] = statistics.median(raws)
        ratios = [t * 1e3 / cfg.steps / r for t, r in zip(seqs, raws, strict=True)]
        out["ratio"] = statistics.median(ratios)
    return out


async def fanout(cond: Conductor, cfg: Config) -> dict[str, float]:
    n, t0 = cfg.run_steps, time.perf_counter()
    handles = await asyncio.gather(*(cond.start(steps, {"n": n}) for _ in range(cfg.runs)))
    expect(await asyncio.gather(*(h.result() for h in handles)), [n] * cfg.runs)
    total = time.perf_counter() - t0
    return {
        "fan_s": total,
        "fan_wf_per_s": cfg.runs / total,
        "fan_steps_per_s": cfg.runs * n / total,
    }


async def start_once(cond: Conductor, i: int) -> float:
    t0 = time.perf_counter()
    expect(await (await cond.start(steps, {"n": 1})).result(), 1)
    return time.perf_counter() - t0


async def send_once(cond: Conductor, i: int) -> float:
    handle = await cond.start(wait_go)
    while True:  # until claimed: RUNNING (or SUSPENDED if hot_wait=0)
        if await handle.status() != RunStatus.PENDING:
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # let it reach receive() (and suspend, if hot_wait=0)
    t0 = time.perf_counter()
    await handle.send("go", i)
    expect(await handle.result(), i)
    return time.perf_counter() - t0


async def latency(cond: Conductor, cfg: Config, key: str, once: Once) -> dict[str, float]:
    """Median and nearest-rank p95 in ms of ``once``, after ``cfg.warmup`` unmeasured calls."""
    samples = sorted([await once(cond, i) for i in range(cfg.warmup + cfg.reps)][cfg.warmup :])
    p95 = samples[max(0, math.ceil(0.95 * len(samples)) - 1)]
    return {f"{key}_p50_ms": statistics.median(samples) * 1e3, f"{key}_p95_ms": p95 * 1e3}


@contextlib.asynccontextmanager
async def raw_sqlite(path: str, n: int) -> AsyncIterator[Raw]:
    """Samples: median ms of ``n`` BEGIN IMMEDIATE; INSERT; COMMIT in WAL mode,
    synchronous=NORMAL (the store's settings), in a file of its own."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.executescript(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
        "CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB NOT NULL)"
    )

    def commits() -> float:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (data) VALUES (?)", (PAYLOAD,))
            conn.execute("COMMIT")
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3

    async def sample() -> float:
        return await asyncio.to_thread(commits)

    try:
        yield sample
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def raw_postgres(schema: str, n: int) -> AsyncIterator[Raw]:
    """Samples: median ms of ``n`` autocommit single-row INSERTs (asyncpg, prepared),
    after 20 unmeasured ones, into a table of a scratch schema."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    insert = f'INSERT INTO "{schema}".t (data) VALUES ($1)'

    async def sample() -> float:
        samples = []
        for _ in range(n + 20):
            t0 = time.perf_counter()
            await conn.execute(insert, PAYLOAD)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples[20:]) * 1e3

    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'CREATE TABLE "{schema}".t (id bigserial PRIMARY KEY, data bytea)')
        yield sample
    finally:
        with contextlib.suppress(Exception):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def bench_store(store: str, cfg: Config) -> dict[str, Any]:
    print(f"{store}: running...", file=sys.stderr, flush=True)
    row: dict[str, Any] = {"store": store, "errors": {}}
    tag = f"bench_{uuid.uuid4().hex[:10]}"

    async def guarded(phase: str, coro: Any, limit: float = cfg.timeout) -> None:
        """Await one phase under a timeout; a failure is noted in the row, not raised."""
        try:
            async with asyncio.timeout(limit):
                row.update(await coro or {})
        except Exception as exc:
            row["errors"][phase] = f"{type(exc).__name__}: {exc}".strip()
            print(f"  {store} [{phase}] failed: {row['errors'][phase]}", file=sys.stderr)

    async def with_worker(url: str, raw: Raw | None) -> None:
        async with Conductor(url) as cond:
            cond.register(steps, sync_steps, wait_go)
            worker = cond.run(
                concurrency=cfg.concurrency, hot_wait=cfg.hot_wait, handle_sigterm=False
            )
            try:
                phases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                    ("seq", lambda: sequential(cond, cfg, raw)),
                    ("fan", lambda: fanout(cond, cfg)),
                    ("start", lambda: latency(cond, cfg, "start", start_once)),
                    ("send", lambda: latency(cond, cfg, "send", send_once)),
                ]
                for phase, measure in phases:
                    # A full collection owed to an earlier phase's garbage (tens of ms
                    # on a big heap) must not land in a short phase's figure.
                    gc.collect()
                    await guarded(phase, measure())
            finally:
                worker.cancel()  # stops cleanly: awaiting it does not raise
                await guarded("stop", asyncio.wait_for(worker, 10))
                if hasattr(cond.backend, "drop_everything"):  # redis, postgres: our keys/schema
                    await guarded("cleanup", cond.backend.drop_everything())

    with tempfile.TemporaryDirectory(prefix="substantial-bench-") as tmp:
        raw: contextlib.AbstractAsyncContextManager[Raw | None] = contextlib.nullcontext()
        if store == "sqlite":
            raw = raw_sqlite(f"{tmp}/raw.db", cfg.raw)
        elif store == "postgres":
            raw = raw_postgres(f"{tag}_raw", cfg.raw)

        async def measure() -> None:
            async with raw as sample:
                await with_worker(URLS[store].format(tmp=tmp, tag=tag), sample)

        # "open" covers connecting; the nested phases keep their own timeouts and errors
        await guarded("open", measure(), cfg.timeout * 6)
    return row


# -- reporting ----------------------------------------------------------------------
def columns(cfg: Config) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(header, phase, keys, number format) per column."""
    return [
        (f"{cfg.steps}-step s", "seq", ("seq_s",), ".2f"),
        ("steps/s", "seq", ("seq_steps_per_s",), ",.0f"),
        ("ms/step", "seq", ("seq_ms_per_step",), ".3f"),
        ("raw commit ms", "seq", ("raw_ms",), ".3f"),
        ("ratio", "seq", ("ratio",), ".2f"),
        ("ms/step, plain fn", "seq", ("sync_ms_per_step",), ".3f"),
        (f"{cfg.runs}x{cfg.run_steps} wf/s", "fan", ("fan_wf_per_s",), ",.0f"),
        (f"{cfg.runs}x{cfg.run_steps} steps/s", "fan", ("fan_steps_per_s",), ",.0f"),
        ("start→result p50/p95 ms", "start", ("start_p50_ms", "start_p95_ms"), ".2f"),
        ("send→done p50/p95 ms", "send", ("send_p50_ms", "send_p95_ms"), ".2f"),
    ]


def cells(row: dict[str, Any], cfg: Config) -> list[str]:
    out = [row["store"]]
    for _, phase, keys, fmt in columns(cfg):
        errs = row["errors"]
        if phase in errs or "open" in errs:
            out.append("ERR")
        elif any(row.get(k) is None for k in keys):
            out.append("-")
        else:
            out.append(" / ".join(format(row[k], fmt) for k in keys))
    first = next(iter(row["errors"].values()), "")
    out.append(first if len(first) <= 60 else first[:57] + "...")
    return out


def header(cfg: Config) -> list[str]:
    return ["store", *(c[0] for c in columns(cfg)), "error"]


def text_table(rows: list[dict[str, Any]], cfg: Config) -> str:
    grid = [header(cfg), *(cells(r, cfg) for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in grid
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def errors_text(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['store']} [{phase}]: {msg}" for r in rows for phase, msg in r["errors"].items()]


def write_reports(rows: list[dict[str, Any]], cfg: Config, quick: bool, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    md = ["# Substantial benchmark" + (" (quick)" if quick else ""), ""]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += [f"- config: {', '.join(f'{k}={v}' for k, v in asdict(cfg).items())}", ""]
    md += ["| " + " | ".join(header(cfg)) + " |", "|" + "---|" * len(header(cfg))]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r, cfg)) + " |" for r in rows]
    if errs := errors_text(rows):
        md += ["", "## Errors", "", *(f"- `{e}`" for e in errs)]
    md += ["", "See bench/README.md for what each figure means.", ""]
    (out / "latest.md").write_text("\n".join(md))
    doc = {"machine": info, "quick": quick, "config": asdict(cfg), "results": rows}
    (out / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", default=",".join(URLS), help="comma-separated store names")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--concurrency", type=int, default=64, help="worker concurrency")
    ap.add_argument(
        "--hot-wait",
        type=float,
        default=5.0,
        help="worker hot_wait in seconds (0: waits always suspend)",
    )
    ap.add_argument("--out", type=Path, default=REPORTS, help="directory of the reports")
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := [s for s in stores if s not in URLS]:
        ap.error(f"unknown store(s) {unknown}; choose from {','.join(URLS)}")
    cfg = Config(
        concurrency=args.concurrency, hot_wait=args.hot_wait, **(QUICK if args.quick else {})
    )
    rows = [await bench_store(store, cfg) for store in stores]
    print("\n".join([text_table(rows, cfg), *errors_text(rows)]))
    write_reports(rows, cfg, args.quick, args.out)
    print(f"\nwritten: {args.out / 'latest.md'}, {args.out / 'latest.json'}")


if __name__ == "__main__":
    asyncio.run(main())
