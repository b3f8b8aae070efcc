"""Substantial, DBOS and absurd on the same workloads, in one run, on one PostgreSQL.

    .venv/bin/python bench/peers/driver.py [--quick] [--systems substantial,dbos,absurd]

(``make bench-peers`` / ``make bench-peers QUICK=1`` also build the peers' virtualenv.)
Each system runs in subprocesses of its own interpreter: Substantial in this
one (the project's virtualenv), DBOS and absurd in bench/peers/.venv, installed
from bench/peers/requirements.txt. Each gets a fresh database
``bench_peers_<tag>_<system>``, dropped at the end. Prints one table and
writes bench/reports/peers.{md,json} (``--quick``: peers-quick.{md,json}).
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg
import report

from substantial import Conductor

HERE = Path(__file__).resolve().parent
REPORTS = HERE.parent / "reports"
PEERS_PY = HERE / ".venv" / "bin" / "python"
PG = "postgresql://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/0"
SYSTEMS = ("substantial", "dbos", "absurd")


def runs_for(system: str, tag: str, tmp: str) -> list[dict[str, Any]]:
    """The subprocess runs of one system: (store, mode, url, phases) each."""
    if system != "substantial":
        return [
            {"store": "postgres", "mode": m, "url": "", "phases": ""} for m in ("local", "remote")
        ]
    pg = f"{PG}/bench_peers_{tag}_substantial?schema=peers_sub"
    return [
        {"store": "postgres", "mode": "local", "url": pg, "phases": ""},
        {"store": "postgres", "mode": "remote", "url": pg, "phases": ""},
        {"store": "redis", "mode": "remote", "url": f"{REDIS}?prefix=peers_{tag}",
         "phases": "w3,w4"},
        {"store": "sqlite", "mode": "local", "url": f"sqlite:///{tmp}/peers.db", "phases": "w2"},
    ]  # fmt: skip


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def one_run(
    system: str, dsn: str, run: dict[str, Any], quick: bool, tmp: str
) -> dict[str, Any]:
    """One ``peer_<system>.py MODE`` subprocess; its JSON document, or an error."""
    py = sys.executable if system == "substantial" else str(PEERS_PY)
    out = Path(tmp) / f"{system}-{run['store']}-{run['mode']}.json"
    argv = [py, str(HERE / f"peer_{system}.py"), run["mode"], "--dsn", dsn, "--out", str(out)]
    argv += ["--url", run["url"]] if run["url"] else []
    argv += ["--phases", run["phases"]] if run["phases"] else []
    argv += ["--quick"] if quick else []
    print(f"{system} ({run['store']}, {run['mode']})...", file=sys.stderr, flush=True)
    proc = await asyncio.create_subprocess_exec(*argv)
    try:
        async with asyncio.timeout(1800):
            code = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        code = -9
    if code != 0 or not out.exists():
        return {"system": system, "store": run["store"], "mode": run["mode"],
                "results": {}, "errors": {run["mode"]: f"exited {code}"},
                "versions": {}, "settings": {}}  # fmt: skip
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


async def bench_system(system: str, quick: bool) -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    db = f"bench_peers_{tag}_{system}"
    dsn = f"{PG}/{db}"
    docs = []
    with tempfile.TemporaryDirectory(prefix="peers-driver-") as tmp:
        await admin(f'CREATE DATABASE "{db}"')
        try:
            for run in runs_for(system, tag, tmp):
                docs.append(await one_run(system, dsn, run, quick, tmp))
                if run["store"] == "redis":  # our prefix only, in case the run died
                    async with Conductor(run["url"]) as cond:
                        await cond.backend.drop_everything()  # type: ignore[attr-defined]
        finally:
            await admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    return docs


async def servers() -> dict[str, Any]:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        pg = {"version": await conn.fetchval("SHOW server_version")}
        for name in ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers",
                     "max_connections"):  # fmt: skip
            pg[name] = await conn.fetchval(f"SHOW {name}")
    finally:
        await conn.close()
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS)
    try:
        info = await client.info()
        rd = {"version": info.get("redis_version")}
        for name in ("appendonly", "appendfsync", "save"):
            rd[name] = (await client.config_get(name)).get(name)
    finally:
        await client.aclose()
    return {"postgres": pg, "redis": rd}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "substantial": version("substantial"),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    args = ap.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := [s for s in systems if s not in SYSTEMS]:
        ap.error(f"unknown system(s) {unknown}; choose from {','.join(SYSTEMS)}")
    if any(s != "substantial" for s in systems) and not PEERS_PY.exists():
        sys.exit(f"error: {PEERS_PY} is missing: run `make bench-peers` (it creates it)")
    info = {"machine": machine(), "servers": await servers(), "quick": args.quick}
    t0 = time.perf_counter()
    docs = [doc for system in systems for doc in await bench_system(system, args.quick)]
    info["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["machine"]["wall_s"] = round(time.perf_counter() - t0, 1)
    rows = report.merge(docs)
    print(report.text(rows, info))
    name = "peers-quick" if args.quick else "peers"
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"{name}.md").write_text(report.markdown(rows, info, docs))
    doc = {**info, "rows": rows, "runs": docs}
    (REPORTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten: {REPORTS / (name + '.md')}, {REPORTS / (name + '.json')}")


if __name__ == "__main__":
    asyncio.run(main())
