"""A PENDING run that no live worker serves says so in ``show`` (a warning line;
``"unserved": true`` in ``--json``); one that a live, busy worker serves does not."""

from __future__ import annotations

import json
from typing import Any

from .conftest import APP, Store, Workers, wait_until

WARNING = "no live worker serves workflow"


def start(store: Store, *args: str) -> str:
    [run_id] = store.ok("start", *args).split()
    return run_id


def shown(store: Store, run_id: str) -> dict[str, Any]:
    run: dict[str, Any] = json.loads(store.ok("show", run_id, "--json"))["run"]
    return run


def test_show_warns_of_a_run_no_worker_serves(store: Store, workers: Workers) -> None:
    workers.start(APP)
    mistyped = start(store, "doubel")  # the worker serves "double"
    elsewhere = start(store, "double", "--queue", "nowhere")
    out = store.ok("show", mistyped)
    assert f"{WARNING} 'doubel' on queue 'default'" in out, out
    assert f"{WARNING} 'double' on queue 'nowhere'" in store.ok("show", elsewhere)
    for run_id in (mistyped, elsewhere):
        run = shown(store, run_id)
        assert (run["status"], run["unserved"]) == ("PENDING", True)
    assert store.ok("runs").count("PENDING (no worker)") == 2  # the table marks them too
    done = start(store, "double")
    assert json.loads(store.ok("result", done, "--timeout", "30")) == 2
    assert WARNING not in store.ok("show", done)
    assert shown(store, done)["unserved"] is False


def test_show_does_not_warn_of_a_run_a_busy_worker_serves(store: Store, workers: Workers) -> None:
    # One run at a time on "narrow": the first keeps the worker busy, the second
    # waits PENDING for it, a live worker that serves it.
    workers.start(APP, "--queue", "narrow", "--concurrency", "1")
    gate = store.tmp / "gate"
    kwargs = json.dumps({"gate": str(gate)})
    busy = start(store, "hold", "--kwargs", kwargs, "--queue", "narrow")
    try:
        wait_until(lambda: shown(store, busy)["status"] == "RUNNING", "the first run to start")
        queued = start(store, "hold", "--kwargs", kwargs, "--queue", "narrow")
        run = shown(store, queued)
        assert (run["status"], run["unserved"]) == ("PENDING", False)
        assert WARNING not in store.ok("show", queued)
    finally:
        gate.touch()
    for run_id in (busy, queued):
        assert json.loads(store.ok("result", run_id, "--timeout", "30")) == "through"
