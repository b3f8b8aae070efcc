"""HTTP API latency over a big store: the runs list, the counts, a long run's history.

    python bench/http_api.py [--stores sqlite,postgres] [--runs 100000] [--records 10000] [--quick]

Per store: fills a fresh store through the Conductor (runs of workflows nobody
serves, plus runs a real worker completes, fails or leaves waiting, plus one run
of ``--records`` log records), serves it with ``substantial dashboard`` (uvicorn,
a process of its own) on 127.0.0.1, and times GET requests from this process with
httpx. Prints a table and writes bench/reports/http.{md,json} (``--report`` names
them otherwise); see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from _machine import machine  # bench/ is the script's own directory on sys.path

from substantial import Conductor, Context, RunStatus, workflow

REPORTS = Path(__file__).resolve().parent / "reports"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
URLS = {  # {tmp}: a fresh temp dir; {tag}: a fresh schema / key prefix
    "sqlite": "sqlite:///{tmp}/bench.db",
    "postgres": PG_DSN + "?schema={tag}",
    "redis": "redis://127.0.0.1:6379/0?prefix={tag}",
    "fs": "file://{tmp}/fs",
}
PARKED = ("bench.orders", "bench.emails", "bench.invoices", "bench.exports")  # nobody serves


@workflow(name="bench.http.quick")
async def quick(c: Context, n: int) -> int:
    async def step() -> int:
        return n

    return await c.save(step, name="compute")


@workflow(name="bench.http.fails")
async def fails(c: Context, n: int) -> None:
    raise ValueError(f"order {n} is invalid")


@workflow(name="bench.http.waits")
async def waits(c: Context, n: int) -> Any:
    return await c.receive("approval")


@workflow(name="bench.http.long")
async def long_run(c: Context, n: int) -> int:
    """``n`` log records: a step and a log line per turn."""
    for i in range(n // 2):

        async def step(i: int = i) -> int:
            return i

        await c.save(step, name="charge")
        c.log.info("charged", turn=i)
    return n


@dataclass(frozen=True)
class Config:
    runs: int = 100_000  # runs in the store, the long one included
    worked: int = 1_000  # runs of each worked kind (completed, failed, waiting)
    records: int = 10_000  # log records of the long run
    reps: int = 50
    warmup: int = 5
    prefix: str = "bench_http"  # of the PostgreSQL schema / Redis key prefix
    vacuum: bool = False  # VACUUM (ANALYZE) the PostgreSQL tables once filled


QUICK: dict[str, Any] = {"runs": 5_000, "worked": 100, "records": 1_000, "reps": 10, "warmup": 2}


# -- filling the store ---------------------------------------------------------------


async def fill(cond: Conductor, cfg: Config) -> dict[str, Any]:
    """``cfg.runs`` runs: the parked ones first (oldest), then the worked ones and the
    long run (newest: the first page of the list shows them). Returns its timings."""
    t0 = time.perf_counter()
    parked = cfg.runs - 3 * cfg.worked - 1
    for lo in range(0, parked, 500):
        await asyncio.gather(
            *(
                cond.start(PARKED[i % len(PARKED)], {"order": i}, run_id=f"parked-{i:07d}")
                for i in range(lo, min(lo + 500, parked))
            )
        )
    t1 = time.perf_counter()
    for kind in (quick, fails, waits):
        for i in range(cfg.worked):
            await cond.start(kind, {"n": i}, run_id=f"{kind.name}-{i:05d}")
    await cond.start(long_run, {"n": cfg.records}, run_id="long")
    await cond.run_until_idle(concurrency=64, hot_wait=0)  # the waiting ones suspend
    t2 = time.perf_counter()
    return {"fill_parked_s": t1 - t0, "fill_worked_s": t2 - t1}


async def check_filled(cond: Conductor, cfg: Config) -> None:
    found = await cond.counts()
    total = sum(n for by_status in found.values() for n in by_status.values())
    expect(total, cfg.runs)
    expect(found[long_run.name][RunStatus.COMPLETED], 1)
    expect(found[waits.name][RunStatus.SUSPENDED], cfg.worked)


def expect(got: Any, want: Any) -> None:
    if got != want:  # not assert: must hold under python -O too
        raise AssertionError(f"expected {want!r}, got {got!r}")


# -- the server and the requests -----------------------------------------------------


@contextlib.asynccontextmanager
async def dashboard(url: str) -> AsyncIterator[httpx.AsyncClient]:
    """``substantial dashboard`` on a free loopback port, as an operator runs it; yields
    a client for it once uvicorn says it listens (its log line names the port)."""
    env = {**os.environ, "SUBSTANTIAL_BACKEND": url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "substantial", "dashboard", "--host", "127.0.0.1", "--port", "0",
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr, drain = proc.stderr, None
    try:
        port = None
        async with asyncio.timeout(60):
            while port is None:
                line = await stderr.readline()
                if not line:
                    raise RuntimeError(f"the dashboard exited with {await proc.wait()}")
                if m := re.search(rb"running on http://127\.0\.0\.1:(\d+)", line):
                    port = int(m.group(1))

        async def drain_log() -> None:  # the access log; a full pipe would stall it
            while await stderr.readline():
                pass

        drain = asyncio.create_task(drain_log())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        if drain is not None:
            await drain


Check = Callable[[Any], None]


async def timed(
    client: httpx.AsyncClient, path: str, cfg: Config, check: Check
) -> tuple[float, float]:
    """p50 and nearest-rank p95 in ms of GET ``path``, after ``cfg.warmup`` unmeasured."""
    samples = []
    for i in range(cfg.warmup + cfg.reps):
        t0 = time.perf_counter()
        r = await client.get(path)
        elapsed = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"GET {path}: {r.status_code} {r.text[:200]}")
        if i == 0:
            check(r.json())
        if i >= cfg.warmup:
            samples.append(elapsed * 1e3)
    samples.sort()
    return statistics.median(samples), samples[max(0, math.ceil(0.95 * len(samples)) - 1)]


async def cursor_at(client: httpx.AsyncClient, path: str, entries: int) -> str:
    """The history cursor ``entries`` entries in (pages of 500 followed; not timed)."""
    cursor, seen = "", 0
    while seen < entries:
        doc = (await client.get(path, params={"limit": 500, "cursor": cursor})).json()
        seen, cursor = seen + len(doc["entries"]), doc["next_cursor"]
    return cursor


async def measure(client: httpx.AsyncClient, cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def page_of(n: int) -> Check:
        return lambda doc: expect(len(doc["runs"]), n)

    def counted(doc: Any) -> None:
        expect(sum(sum(w["counts"].values()) for w in doc["workflows"]), cfg.runs)

    def entries(doc: Any) -> None:
        expect(len(doc["entries"]), 50)
        expect(doc["next_cursor"] is not None, True)

    middle = await cursor_at(client, "/api/runs/long/history", cfg.records // 2)
    paths: list[tuple[str, str, Check]] = [
        ("list", "/api/runs", page_of(50)),
        ("list_failed", "/api/runs?status=FAILED", page_of(50)),
        ("list_parked", f"/api/runs?workflow={PARKED[0]}", page_of(50)),
        ("workflows", "/api/workflows", counted),
        ("history", "/api/runs/long/history", entries),
        ("history_mid", f"/api/runs/long/history?cursor={middle}", entries),
        ("run", "/api/runs/long", lambda doc: expect(doc["status"], "COMPLETED")),
    ]
    for key, path, check in paths:
        out[f"{key}_p50_ms"], out[f"{key}_p95_ms"] = await timed(client, path, cfg, check)
    return out


# -- one store -----------------------------------------------------------------------


async def bench_store(store: str, cfg: Config) -> dict[str, Any]:
    print(f"{store}: filling {cfg.runs:,} runs...", file=sys.stderr, flush=True)
    row: dict[str, Any] = {"store": store, "errors": {}}
    tag = f"{cfg.prefix}_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="substantial-bench-http-") as tmp:
        url = URLS[store].format(tmp=tmp, tag=tag)
        cond = Conductor(url)
        cond.register(quick, fails, waits, long_run)
        try:
            row.update(await fill(cond, cfg))
            await check_filled(cond, cfg)
            if cfg.vacuum and store == "postgres":
                await vacuum(tag)
            print(f"{store}: filled; measuring...", file=sys.stderr, flush=True)
            async with dashboard(url) as client:
                row.update(await measure(client, cfg))
        except Exception as exc:
            row["errors"]["run"] = f"{type(exc).__name__}: {exc}".strip()
            print(f"  {store} failed: {row['errors']['run']}", file=sys.stderr)
        finally:
            drop = getattr(cond.backend, "drop_everything", None)
            if drop is not None:  # redis, postgres: our keys / schema
                with contextlib.suppress(Exception):
                    await drop()
            await cond.close()
    return row


async def vacuum(schema: str) -> None:
    """What autovacuum does in time: the visibility map lets counts read the index only."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        for table in ("runs", "log", "inbox"):
            await conn.execute(f'VACUUM (ANALYZE) "{schema}".{table}')
    finally:
        await conn.close()


async def postgres_server() -> str:
    """The server's version and whether autovacuum runs (it decides the counts' plan)."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        server = await conn.fetchval("SHOW server_version")
        return f"{server}, autovacuum={await conn.fetchval('SHOW autovacuum')}"
    finally:
        await conn.close()


# -- reporting -----------------------------------------------------------------------

COLUMNS = [  # header, key prefix
    ("runs list, first page", "list"),
    ("workflows (counts)", "workflows"),
    ("history, first page", "history"),
    ("runs list ?status=FAILED", "list_failed"),
    ("runs list ?workflow=", "list_parked"),
    ("history, middle page", "history_mid"),
    ("run page", "run"),
]


def cells(row: dict[str, Any]) -> list[str]:
    out = [row["store"]]
    for _, key in COLUMNS:
        p50, p95 = row.get(f"{key}_p50_ms"), row.get(f"{key}_p95_ms")
        out.append("ERR" if p50 is None or p95 is None else f"{p50:.1f} / {p95:.1f}")
    fill = [row.get("fill_parked_s"), row.get("fill_worked_s")]
    out.append("-" if None in fill else " + ".join(f"{s:.0f}" for s in fill))
    first = next(iter(row["errors"].values()), "")
    out.append(first if len(first) <= 60 else first[:57] + "...")
    return out


def header() -> list[str]:
    return ["store", *(f"{h} p50/p95 ms" for h, _ in COLUMNS), "fill s", "error"]


def text_table(rows: list[dict[str, Any]]) -> str:
    grid = [header(), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in grid]  # fmt: skip
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_reports(
    rows: list[dict[str, Any]], cfg: Config, quick: bool, name: str, info: dict[str, Any]
) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    md = ["# Substantial HTTP API benchmark" + (" (quick)" if quick else ""), ""]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += [f"- config: {', '.join(f'{k}={v}' for k, v in asdict(cfg).items())}", ""]
    md += ["| " + " | ".join(header()) + " |", "|" + "---|" * len(header())]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    errs = [f"{r['store']}: {msg}" for r in rows for msg in r["errors"].values()]
    if errs:
        md += ["", "## Errors", "", *(f"- `{e}`" for e in errs)]
    md += ["", "Target: under 50 ms each. See bench/README.md for what each figure means.", ""]
    (REPORTS / f"{name}.md").write_text("\n".join(md))
    doc = {"machine": info, "quick": quick, "config": asdict(cfg), "results": rows}
    (REPORTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--stores", default="sqlite,postgres", help="comma-separated store names")
    ap.add_argument("--runs", type=int, help="runs in the store (default 100,000)")
    ap.add_argument("--records", type=int, help="log records of the long run (default 10,000)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--prefix", default="bench_http", help="PostgreSQL schema / Redis prefix")
    ap.add_argument("--report", default="http", help="report name: bench/reports/NAME.{md,json}")
    ap.add_argument("--vacuum", action="store_true", help="VACUUM PostgreSQL once filled")
    args = ap.parse_args()
    logging.getLogger("substantial").setLevel(logging.CRITICAL)  # the failing runs' tracebacks
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := [s for s in stores if s not in URLS]:
        ap.error(f"unknown store(s) {unknown}; choose from {','.join(URLS)}")
    cfg = replace(Config(prefix=args.prefix, vacuum=args.vacuum), **(QUICK if args.quick else {}))
    if args.runs is not None:
        cfg = replace(cfg, runs=args.runs)
    if args.records is not None:
        cfg = replace(cfg, records=args.records)
    if cfg.runs < 3 * cfg.worked + 1:
        ap.error(f"--runs must be at least {3 * cfg.worked + 1}")
    info = machine()
    if "postgres" in stores:
        info["postgres"] = await postgres_server()
    rows = [await bench_store(store, cfg) for store in stores]
    print(text_table(rows))
    write_reports(rows, cfg, args.quick, args.report, info)
    print(f"\nwritten: {REPORTS / args.report}.md, .json")


if __name__ == "__main__":
    asyncio.run(main())
