"""``substantial worker``: what APP may name, clean stops, and ``--processes``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from substantial import Conductor, RunStatus

from .app import approval, boom, double
from .conftest import APP, WITH_S3, Store, Workers, one_error_line, wait_until


def status(store: Store, run_id: str) -> str:
    [row] = json.loads(
        store.ok("runs", "--json", "--filter", json.dumps({"run_id": {"eq": run_id}}))
    )["runs"]
    return str(row["status"])


def start(store: Store, *args: str) -> str:
    return store.ok("start", *args).strip()


def test_a_module_serves_every_workflow_in_it(store: Store, workers: Workers) -> None:
    worker = workers.start("tests.cli.app")
    assert "workflows approval, boom, double" in worker.stderr()
    run_id = start(store, "double", "--kwargs", '{"n": 7}')
    assert json.loads(store.ok("result", run_id, "--timeout", "30")) == 14


def test_a_workflow_attribute_serves_that_workflow(store: Store, workers: Workers) -> None:
    worker = workers.start("tests.cli.app:double")
    assert "workflows double," in worker.stderr()
    run_id = start(store, "double")
    assert json.loads(store.ok("result", run_id, "--timeout", "30")) == 2


def test_a_conductor_attribute_uses_its_own_store_without_backend(
    store: Store, workers: Workers
) -> None:
    workers.start(APP, backend=False)  # the app's Conductor() reads SUBSTANTIAL_BACKEND
    run_id = start(store, "double", "--kwargs", '{"n": 2}')
    assert json.loads(store.ok("result", run_id, "--timeout", "30")) == 4


@WITH_S3
def test_worker_options_reach_the_worker(store: Store, workers: Workers) -> None:
    worker = workers.start(APP, "--queue", "slow", "--queue", "bulk", "--concurrency", "3",
                           "--lease", "7.5")  # fmt: skip
    assert "queues slow, bulk" in worker.stderr()
    assert "concurrency 3, lease 7.5s" in worker.stderr()
    served = [start(store, "double", "--queue", q) for q in ("slow", "bulk")]
    ignored = start(store, "double")  # the default queue: this worker does not serve it
    for run_id in served:
        assert json.loads(store.ok("result", run_id, "--timeout", "30")) == 2
    assert status(store, ignored) == "PENDING"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_worker_with_exit_0(
    store: Store, workers: Workers, sig: signal.Signals
) -> None:
    worker = workers.start()
    assert worker.signal(sig) == 0
    assert f"{sig.name} received" in worker.stderr()
    assert "stopped" in worker.stderr()
    assert "Traceback" not in worker.stderr()


SLOW_APP = """\
import pathlib, time
pathlib.Path("importing").write_text("")
time.sleep(1.5)  # an APP that takes a while to import
from tests.cli.app import conductor
"""


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_app_loads_stops_the_worker_with_exit_0(
    sqlite_store: Store, sig: signal.Signals, processes: str
) -> None:
    """Before the worker's loop runs, a signal is held, then acted on: exit 0."""
    Path(sqlite_store.tmp, "slow_app.py").write_text(SLOW_APP)
    worker = Workers(sqlite_store).spawn("slow_app:conductor", "--processes", processes)
    marker = sqlite_store.tmp / "importing"
    wait_until(lambda: marker.exists() or worker.proc.poll() is not None, "APP to be importing")
    assert worker.signal(sig) == 0, worker.stderr()
    assert f"{sig.name} received" in worker.stderr()
    assert "Traceback" not in worker.stderr()


def test_a_stopped_worker_hands_back_its_runs(store: Store, workers: Workers) -> None:
    """With a long lease, only a released lease lets another worker take the run at once."""
    worker = workers.start(APP, "--lease", "120")
    run_id = start(store, "approval")
    wait_until(lambda: status(store, run_id) == "SUSPENDED", "the run to wait for its event")
    assert worker.signal(signal.SIGTERM) == 0
    assert "handing back 1 runs" in worker.stderr()

    async def finish_here() -> RunStatus:
        async with Conductor(store.url) as c:
            c.register(double, boom, approval)
            await c.handle(run_id).send("decision", "late")
            await c.run_until_idle()  # claims only what is due and not leased
            return await c.handle(run_id).status()

    assert asyncio.run(finish_here()) == RunStatus.COMPLETED


@pytest.mark.parametrize(
    ("app", "says"),
    [
        ("no_such_module", "cannot import 'no_such_module': no module named 'no_such_module'"),
        ("tests.cli.app:nope", "module 'tests.cli.app' has no attribute 'nope'"),
        ("tests.cli.app:Any", "expected a Conductor or a @workflow"),
        ("substantial.errors", "defines no @workflow"),
        ("tests.cli.app:", "APP must be 'module' or 'module:attr'"),
        ("broken_app", "importing 'broken_app' failed: RuntimeError: no config"),
    ],
)
def test_a_bad_app_is_exit_2(sqlite_store: Store, app: str, says: str) -> None:
    Path(sqlite_store.tmp, "broken_app.py").write_text("raise RuntimeError('no config')\n")
    proc = sqlite_store.cli("worker", app)
    assert proc.returncode == 2
    assert says in one_error_line(proc)


# -- --processes -------------------------------------------------------------------------


def live_children(pid: int) -> set[int]:
    """Pids of the running (not zombie) children of ``pid``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


PROCESSES = 4
RUNS = 8


async def start_waiting_runs(url: str, notes: Path, tags: list[str]) -> list[str]:
    """Start a ``tally`` run per tag and return once every one waits for its event
    (its first step recorded: the wait's record follows it)."""
    async with Conductor(url) as c:
        handles = [await c.start("tally", {"path": str(notes), "tag": t}) for t in tags]
        deadline = time.monotonic() + 60
        while {await h.status() for h in handles} != {RunStatus.SUSPENDED}:
            assert time.monotonic() < deadline, "timed out waiting for the runs to wait"
            await asyncio.sleep(0.05)  # another process's progress: nothing to await here
        return [h.run_id for h in handles]


async def finish_runs(url: str, run_ids: list[str], tags: list[str]) -> list[object]:
    async with Conductor(url) as c:
        for run_id, tag in zip(run_ids, tags, strict=True):
            await c.handle(run_id).send("go", tag)
        return list(await asyncio.gather(*(c.handle(r).result(timeout=90) for r in run_ids)))


def noted(notes: Path) -> list[tuple[str, str, int]]:
    """(phase, tag, pid) for every step effect that ran, in the order they ran."""
    rows = [line.split() for line in notes.read_text().splitlines()]
    return [(phase, tag, int(pid)) for phase, tag, pid in rows]


@pytest.mark.crash
@WITH_S3
def test_processes_restart_a_killed_child_and_every_run_completes_once(
    store: Store, workers: Workers
) -> None:
    # the module: every workflow in it (``tally`` too), on the --backend store
    sup = workers.spawn("tests.cli.app", "--processes", str(PROCESSES), "--lease", "2")
    wait_until(lambda: sup.stderr().count(" started: ") == PROCESSES, "the worker processes", 90)
    first = live_children(sup.proc.pid)
    assert len(first) == PROCESSES
    notes = store.tmp / "notes.txt"
    tags = [f"run-{n}" for n in range(RUNS)]
    run_ids = asyncio.run(start_waiting_runs(store.url, notes, tags))

    # The victim is the child that drove the most runs: those wait in it, leased.
    drove = Counter(pid for phase, _, pid in noted(notes) if phase == "before")
    [(victim, _)] = drove.most_common(1)
    assert victim in first
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: sup.stderr().count(" started: ") == PROCESSES + 1, "a replacement", 90)
    second = live_children(sup.proc.pid)
    assert len(second) == PROCESSES and victim not in second
    assert len(second & first) == PROCESSES - 1  # only the killed one was replaced
    assert f"(pid {victim}) exited with SIGKILL; starting it again" in sup.stderr()

    assert asyncio.run(finish_runs(store.url, run_ids, tags)) == tags
    ran = noted(notes)
    # Every step of every run ran exactly once: none was in flight at the kill, and
    # the victim's runs were replayed elsewhere without repeating their first step.
    assert Counter((phase, tag) for phase, tag, _ in ran) == {
        (phase, tag): 1 for phase in ("before", "after") for tag in tags
    }
    victims_runs = {tag for phase, tag, pid in ran if phase == "before" and pid == victim}
    assert victims_runs and all(
        pid in second for phase, tag, pid in ran if phase == "after" and tag in victims_runs
    )
    listed = json.loads(store.ok("runs", "--json"))["runs"]
    assert sorted(r["run_id"] for r in listed) == sorted(run_ids)
    assert {r["status"] for r in listed} == {"COMPLETED"}

    assert sup.signal(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in second)
    assert "all worker processes stopped" in sup.stderr()
    assert "Traceback" not in sup.stderr()


def test_a_worker_waits_out_an_unreachable_store_and_stops_with_0(
    sqlite_store: Store,
) -> None:
    url = "postgresql://u:pw-42x@127.0.0.1:1/db"
    ws = Workers(Store(kind="postgres", url=url, tmp=sqlite_store.tmp))
    worker = ws.spawn(APP)
    wait_until(lambda: "unreachable" in worker.stderr(), "the outage to be logged")
    assert worker.proc.poll() is None  # a worker rides out an outage; it does not exit
    assert worker.signal(signal.SIGTERM) == 0
    assert "pw-42x" not in worker.stderr()


@pytest.mark.crash
def test_a_child_that_cannot_start_stops_the_supervisor_with_2(
    sqlite_store: Store,
) -> None:
    """As gunicorn halts on a worker that fails to boot: a broken deploy is not
    restarted forever; the healthy children are stopped and the supervisor exits 2."""
    Path(sqlite_store.tmp, "deployed_app.py").write_text(
        "import os\n"
        "from tests.cli.app import approval, boom, double\n"
        "if os.path.exists('broken-deploy'):\n"
        "    raise RuntimeError('broken deploy')\n"
    )
    ws = Workers(sqlite_store)
    sup = ws.spawn("deployed_app", "--processes", "2")
    try:
        wait_until(lambda: sup.stderr().count(" started: ") == 2, "two worker processes")
        first = live_children(sup.proc.pid)
        Path(sqlite_store.tmp, "broken-deploy").touch()
        os.kill(min(first), signal.SIGKILL)
        assert sup.proc.wait(timeout=60) == 2
    finally:
        ws.stop_all()
    last = sup.stderr().splitlines()[-1]
    assert last.startswith("error: worker process") and "could not start (exit 2)" in last
    assert "importing 'deployed_app' failed: RuntimeError: broken deploy" in sup.stderr()
    assert not any(alive(pid) for pid in first)


def test_metrics_port_serves_the_workers_counters(store: Store, workers: Workers) -> None:
    from urllib.request import urlopen

    from ..integration.servers import free_port

    port = free_port()
    worker = workers.start(APP, "--metrics-port", str(port))
    run_id = start(store, "double", "--kwargs", '{"n": 4}')
    assert json.loads(store.ok("result", run_id, "--timeout", "30")) == 8
    assert f"metrics on http://127.0.0.1:{port}/metrics" in worker.stderr()

    def scraped() -> str:
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    wanted = 'substantial_runs_ended_total{status="COMPLETED",workflow="double"} 1.0'
    wait_until(lambda: wanted in scraped(), "the ended run to be counted")
