"""Same machine, same minutes: this checkout's figures beside an earlier commit's.

    python bench/compare.py REF [--stores memory,postgres] [--rounds 3] [--quick]

A report written on another day, or on another host, cannot say whether a change
made the engine slower: on a shared two-core machine the same code moves by 10-50%
between runs. This runs ``bench/run.py`` (this checkout's, so both sides are
measured the same way) once per store and side, alternating the sides and their
order round by round (ABBA), with ``PYTHONPATH`` pointing at this checkout's
``src/`` or at REF's (exported with ``git archive``). The median of each figure
over the rounds is compared; the store's own raw commit is shown beside them.

Prints a table and writes bench/reports/compare.{md,json}. REF must be able to run
bench/run.py's workflows (``Conductor.register``, ``run(handle_sigterm=...)``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

from _machine import machine  # bench/ is the script's own directory on sys.path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REPORTS = BENCH / "reports"
# (key in run.py's results, label, True if higher is better); raw_ms is the store's
# own commit, shown for context and not judged: it is not the engine's.
FIGURES = [
    ("seq_ms_per_step", "ms/step", False),
    ("raw_ms", "raw commit ms", None),
    ("ratio", "ratio", False),
    ("sync_ms_per_step", "ms/step, plain fn", False),
    ("fan_wf_per_s", "200x10 wf/s", True),
    ("start_p50_ms", "start→result p50 ms", False),
    ("start_p95_ms", "start→result p95 ms", False),
    ("send_p50_ms", "send→done p50 ms", False),
    ("send_p95_ms", "send→done p95 ms", False),
]


def export(ref: str, into: Path) -> Path:
    """REF's ``src/`` tree under ``into``; exits 2 with one line if REF is unknown."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src"],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"compare: cannot export {ref!r}: {done.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(done.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def rev(ref: str) -> str:
    """The commit ``ref`` names, short (``HEAD``: with ``+dirty`` if the tree is)."""
    git = ["git", "-C", str(ROOT)]
    out = subprocess.run([*git, "rev-parse", "--short", ref], capture_output=True, text=True)
    name = out.stdout.strip() or ref
    if ref == "HEAD" and subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "src"]).returncode:
        name += "+dirty"
    return name


def bench_once(src: Path, store: str, out: Path, extra: list[str]) -> dict[str, Any]:
    """One ``run.py`` of one store with ``src`` first on the path: its result row."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(BENCH / "run.py"), "--stores", store, "--out", str(out), *extra]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    row: dict[str, Any] = json.loads((out / "latest.json").read_text())["results"][0]
    return row


def imported_from(src: Path) -> None:
    """Make sure ``PYTHONPATH`` wins over the installed package (an editable install
    could otherwise shadow REF's tree and compare this checkout with itself)."""
    probe = "import substantial, sys; sys.stdout.write(substantial.__file__)"
    env = {**os.environ, "PYTHONPATH": str(src)}
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if not found.stdout.startswith(str(src)):
        sys.exit(f"compare: substantial imports from {found.stdout!r}, not from {src}")


def verdict(ref: float, cur: float, higher_better: bool | None, noise: float) -> str:
    if higher_better is None or ref <= 0:
        return ""
    change = (cur - ref) / ref
    if abs(change) <= noise:
        return "same"
    return "better" if (change > 0) == higher_better else "worse"


def summarize(
    runs: dict[str, dict[str, list[dict[str, Any]]]], noise: float
) -> list[dict[str, Any]]:
    """Per store and figure: both sides' medians over the rounds and the verdict."""
    out = []
    for store, sides in runs.items():
        for key, label, higher in FIGURES:
            values = {
                s: [r[key] for r in rows if r.get(key) is not None] for s, rows in sides.items()
            }
            if not values["ref"] or not values["current"]:
                continue
            ref, cur = statistics.median(values["ref"]), statistics.median(values["current"])
            out.append({"store": store, "figure": label, "key": key, "ref": ref,
                        "current": cur, "change": (cur - ref) / ref if ref else None,
                        "verdict": verdict(ref, cur, higher, noise),
                        "samples": values})  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| store | figure | ref | current | change | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        change = "" if r["change"] is None else f"{r['change']:+.1%}"
        lines.append(f"| {r['store']} | {r['figure']} | {r['ref']:,.3f} | {r['current']:,.3f} "
                     f"| {change} | {r['verdict']} |")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ref", help="the commit to compare with (any git revision)")
    ap.add_argument("--stores", default="memory,sqlite,fs,redis,postgres")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side per store")
    ap.add_argument("--noise", type=float, default=0.05, help="a change within this is 'same'")
    ap.add_argument("--quick", action="store_true", help="run.py --quick (a smoke run)")
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    extra = ["--quick"] if args.quick else []
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {"ref": [], "current": []} for s in stores
    }
    with tempfile.TemporaryDirectory(prefix="substantial-compare-") as tmp:
        srcs = {"ref": export(args.ref, Path(tmp) / "ref"), "current": ROOT / "src"}
        for src in srcs.values():
            imported_from(src)
        for n in range(args.rounds):
            for store in stores:
                order = ["ref", "current"] if n % 2 == 0 else ["current", "ref"]
                for side in order:
                    print(f"round {n + 1}/{args.rounds}: {store}, {side}", file=sys.stderr)
                    row = bench_once(srcs[side], store, Path(tmp) / "out", extra)
                    if row["errors"]:
                        print(f"  errors: {row['errors']}", file=sys.stderr)
                    runs[store][side].append(row)
    rows = summarize(runs, args.noise)
    ref, cur = rev(args.ref), rev("HEAD")
    head = [f"# Substantial benchmark: {cur} (this checkout) beside {ref}", ""]
    head += [f"- {k}: {v}" for k, v in machine().items()]
    head += [f"- rounds: {args.rounds} per side and store, ABBA order; medians shown",
             f"- noise: a change within {args.noise:.0%} is 'same'"
             + ("; quick sizes" if args.quick else ""), ""]  # fmt: skip
    md = [*head, *table(rows), "", "See bench/README.md for what each figure means.", ""]
    print("\n".join(table(rows)))
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "compare.md").write_text("\n".join(md))
    doc = {"ref": ref, "current": cur, "machine": machine(), "rounds": args.rounds, "rows": rows}
    (REPORTS / "compare.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten: {REPORTS / 'compare.md'}, {REPORTS / 'compare.json'}")


if __name__ == "__main__":
    main()
