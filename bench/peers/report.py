"""The peers bench's table, its comparison with issue 9's targets, and its report."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]


def merge(docs: list[dict[str, Any]]) -> list[Row]:
    """One row per (system, store): the results and errors of its runs together."""
    rows: dict[tuple[str, str], Row] = {}
    for doc in docs:
        key = (doc["system"], doc["store"])
        row = rows.setdefault(key, {"system": key[0], "store": key[1], "results": {},
                                    "errors": {}, "versions": {}, "settings": {},
                                    "config": doc.get("config", {})})  # fmt: skip
        row["results"].update(doc["results"])
        row["errors"].update({f"{doc['mode']}/{k}": v for k, v in doc["errors"].items()})
        row["versions"].update(doc.get("versions", {}))
        row["settings"].update(doc.get("settings", {}))
        row["config"] = doc.get("config") or row["config"]
    return list(rows.values())


def columns(rows: list[Row]) -> list[tuple[str, tuple[str, ...], str]]:
    """(header, result keys, number format) of the table's columns."""
    fan = next((r["config"]["fan"] for r in rows if r["config"].get("fan")), [])
    cols = [(f"W1 {n}x{s} wf/s", (f"w1_{n}x{s}_wf_per_s",), ",.0f") for n, s in fan]
    cols += [
        ("W2 ms/step", ("w2_ms_per_step",), ".3f"),
        ("raw commit ms", ("w2_raw_ms",), ".3f"),
        ("W2 ratio", ("w2_ratio",), ".2f"),
        ("W3 p50/p95 ms", ("w3_p50_ms", "w3_p95_ms"), ".1f"),
        ("W4 p50/p95 ms", ("w4_p50_ms", "w4_p95_ms"), ".1f"),
        ("W5 done/resume s", ("w5_done_s", "w5_resume_s"), ".2f"),
        ("W5 re-exec", ("w5_reexecuted",), "d"),
        ("W6 ratio", ("w6_ratio",), ".2f"),
        ("W7 xact/min med/mean", ("w7_xact_per_min", "w7_xact_per_min_mean"), ",.0f"),
        ("W7 RSS MB", ("w7_rss_mb",), ".0f"),
    ]
    return cols


def cell(row: Row, keys: tuple[str, ...], fmt: str) -> str:
    res = row["results"]
    if all(res.get(k) is not None for k in keys):
        return " / ".join(format(res[k], fmt) for k in keys)
    phase = keys[0].split("_")[0]
    failed = any(
        label.split("/")[1].startswith(phase) or label.split("/")[1] in ("local", "remote")
        for label in row["errors"]
    )
    return "ERR" if failed else "-"


def grid(rows: list[Row]) -> list[list[str]]:
    cols = columns(rows)
    head = ["system", "store", *(c[0] for c in cols)]
    return [head, *([r["system"], r["store"], *(cell(r, k, f) for _, k, f in cols)] for r in rows)]


# -- targets ---------------------------------------------------------------------------------
def find(rows: list[Row], system: str, store: str = "postgres") -> dict[str, Any]:
    return next((r["results"] for r in rows if (r["system"], r["store"]) == (system, store)), {})


def at_least(value: float | None, target: float, unit: str = "x") -> tuple[str, str]:
    if value is None:
        return "-", "not measured"
    if value >= target:
        return f"{value:.2f}{unit}", "met"
    return f"{value:.2f}{unit}", f"missed: {target / value:.2f}x short of {target:g}{unit}"


def at_most(value: float | None, target: float, unit: str = "") -> tuple[str, str]:
    if value is None:
        return "-", "not measured"
    shown = f"{value}{unit}" if isinstance(value, int) else f"{value:.2f}{unit}"
    if value <= target:
        return shown, "met"
    return shown, f"missed: {value / target:.2f}x the target ({value - target:+.2f}{unit})"


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if a.get(key) is None or not b.get(key):
        return None
    return float(a[key]) / float(b[key])


def targets(rows: list[Row]) -> list[tuple[str, str, str, str]]:
    """(workload, target, measured, verdict) for each of issue 9's targets."""
    sub, dbos, absurd = find(rows, "substantial"), find(rows, "dbos"), find(rows, "absurd")
    redis, sqlite = find(rows, "substantial", "redis"), find(rows, "substantial", "sqlite")
    lease = next((r["config"].get("lease") for r in rows if r["config"]), 5.0)
    fan = next((r["config"]["fan"] for r in rows if r["config"].get("fan")), [])
    out: list[tuple[str, str, str, str]] = []

    def add(work: str, target: str, check: Callable[[], tuple[str, str]]) -> None:
        out.append((work, target, *check()))

    for n, s in fan:
        key = f"w1_{n}x{s}_wf_per_s"
        add(f"W1 {n}x{s} vs DBOS", ">= 20x DBOS", lambda k=key: at_least(ratio(sub, dbos, k), 20))
        add(
            f"W1 {n}x{s} vs absurd",
            ">= 8x absurd",
            lambda k=key: at_least(ratio(sub, absurd, k), 8),
        )
    add("W2 PostgreSQL", "<= 1.2x raw commit", lambda: at_most(sub.get("w2_ratio"), 1.2, "x"))
    add("W2 SQLite", "<= 3x raw commit", lambda: at_most(sqlite.get("w2_ratio"), 3, "x"))
    for w in ("w3", "w4"):
        for name, res in (("PostgreSQL", sub), ("Redis", redis)):
            add(f"{w.upper()} {name}", "<= 5 ms median",
                lambda r=res, k=f"{w}_p50_ms": at_most(r.get(k), 5, " ms"))  # fmt: skip
    add("W5 re-executed steps", "0", lambda: at_most(sub.get("w5_reexecuted"), 0))
    add("W5 kill to result", f"<= lease + 1 s = {lease + 1:g} s",
        lambda: at_most(sub.get("w5_done_s"), lease + 1, " s"))  # fmt: skip
    add("W6 10x steps", "<= 11x the time", lambda: at_most(sub.get("w6_ratio"), 11, "x"))

    def idle() -> tuple[str, str]:
        shown, verdict = at_most(sub.get("w7_xact_per_s"), 1, "/s")
        if sub.get("w7_xact_per_min_mean") is not None:
            shown += f" (mean {sub['w7_xact_per_min_mean'] / 60:.2f}/s)"
        return shown, verdict

    add("W7 idle store ops", "<= 1 per s per idle worker (median slice)", idle)
    add("W7 worker RSS", "< 200 MB", lambda: at_most(sub.get("w7_rss_mb"), 200, " MB"))
    return out


# -- output ----------------------------------------------------------------------------------
def plain(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = [" | ".join(c.ljust(w) for c, w in zip(ln, widths, strict=True)).rstrip() for ln in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def md_table(lines: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in ln] for ln in lines]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0]),
            *("| " + " | ".join(ln) + " |" for ln in esc[1:])]  # fmt: skip


def errors(rows: list[Row]) -> list[str]:
    return [f"{r['system']}/{r['store']} [{k}]: {v}" for r in rows for k, v in r["errors"].items()]


def text(rows: list[Row], info: dict[str, Any]) -> str:
    tgt = [["workload", "target", "Substantial", "verdict"], *map(list, targets(rows))]
    return "\n".join([plain(grid(rows)), "", plain(tgt), *errors(rows)])


NOTES = """\
## How to read it

One machine, one PostgreSQL (fsync on), each system in its own processes,
one after another. W1, W2 and W6 run client and worker in one process; W3,
W4, W5 and W7 use a client process and worker processes. What each figure is
(and the settings that decide the peers' latencies) is in bench/README.md,
section "Peers". In short:

- **W1** runs started at once, first start to last result. **W2** one
  1,000-step run, ms per step, against a raw single-row INSERT+COMMIT
  measured just before each of its rounds (asyncpg, as bench/run.py).
  **W6** a 10,000-step run's time over W2's median 1,000-step run.
- **W3** start to result of a 1-step run, **W4** send to result of a run
  waiting in receive, both seen by a client in another process, one at a
  time (up to the sample count or the time budget: `w3_n`, `w4_n` in the JSON).
  DBOS's client learns of a queued start only when the worker polls its queue
  (every 1 s by default) and of a result when it polls (every 1 s by default);
  absurd's worker polls for work every 0.25 s and its client polls results
  from 50 ms doubling to 1 s. Substantial's worker and client are woken by
  notifications (LISTEN/NOTIFY, pub/sub).
- **W5** SIGKILL of the worker 10 ms after step 10 of 20 took effect (its
  step 11 is then in its 30 ms pause, before its effect), a new worker process
  started at once: kill to the result seen by the client (and to the new
  worker's first step); re-executed = effects that happened twice. Lease 5 s
  for Substantial and absurd (claim timeout); DBOS has no lease: the next
  process with the same executor id recovers the run when it launches.
- **W7** runs sleeping an hour on one worker process with nothing else
  connected: `xact_commit + xact_rollback` of the system's database in
  pg_stat_database (read from another database) in slices of the idle window;
  the figure is the median slice's rate, the mean over the window beside it
  (pg_stat_database takes in a backend's counts late, so a burst before the
  window can show up in it: see bench/README.md); and the worker's RSS at its end.
"""


WHY = """\
### Where the time goes when a target is missed

Measured with profilers on this machine (see the issue notes); what would close each:

- **W1 against the peers**: both sides are bound by PostgreSQL commits.
  Substantial batches its runs' appends into one statement per batch (group
  commit), and a claim returns each claimed run's log and inbox with its lease
  (no read of its own). What is left per run: its start (a commit of its own),
  its end (a commit, a notification) and the client's reads of the result (one
  before it waits, one when the end's hint comes). 1000x1 is all of that and one
  step, so the per-run round trips dominate. To close it: starts made at once by
  one client batched into one transaction, as appends are, and hints that say
  a run ended, so a waiting client skips the look before it waits and the looks
  at hints of changes that are not the end.
- **W2 on PostgreSQL**: one step is one INSERT and its commit. The extra over a
  raw commit (about 0.08-0.15 ms) is the engine (about 0.03 ms: the memory
  store's ms/step), asyncpg's per-statement overhead from Python, and the
  fencing: the INSERT locks the run's row FOR SHARE so a claim cannot slip
  between the token check and the commit, and that lock is written to the WAL.
  To close it: fence with an advisory lock (kept in memory) instead of a row lock.
- **W2 on SQLite**: a raw commit here is 0.008-0.02 ms; the engine alone costs
  about 0.025 ms per step, so 3x the commit is below what the Python engine
  costs before it touches the store. Writes already run inline, without a
  thread hop.
"""


def markdown(rows: list[Row], info: dict[str, Any], docs: list[dict[str, Any]]) -> str:
    m = info["machine"]
    md = ["# Peers benchmark: Substantial, DBOS, absurd" + (" (quick)" if info["quick"] else ""),
          "", f"- date: {m['date']}, wall time {m.get('wall_s', '?')} s",
          f"- machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['platform']}, "
          f"Python {m['python']}; load average {m['load_avg_at_start']} at the start, "
          f"{m.get('load_avg_at_end')} at the end"]  # fmt: skip
    for name, srv in info["servers"].items():
        md.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in srv.items()))
    versions: dict[str, dict[str, str]] = {}
    for r in rows:
        versions.setdefault(r["system"], {}).update(r["versions"])
    for system, vers in versions.items():
        md.append(f"- {system}: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    cfg = next((r["config"] for r in rows if r["config"]), {})
    md += ["- sizes: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), "", "## Results", ""]
    md += md_table(grid(rows))
    md += ["", "## Against the targets of issue 9", ""]
    md += md_table([["workload", "target", "Substantial", "verdict"], *map(list, targets(rows))])
    md += ["", WHY]
    md += ["## Settings", ""]
    seen: set[str] = set()
    for r in rows:
        if r["system"] not in seen:
            seen.add(r["system"])
            md.append(f"- {r['system']}: " + json.dumps(r["settings"], ensure_ascii=False))
    md += ["", NOTES]
    if errs := errors(rows):
        md += ["## Errors", "", *(f"- `{e}`" for e in errs), ""]
    return "\n".join(md)
