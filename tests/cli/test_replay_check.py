"""``substantial export`` and ``substantial replay-check`` in subprocesses, over a
run suspended in a real SQLite store by the code of ``flow_v1.py``; ``flow_v2.py``
is the same workflow with a call added before the run's wait: a deploy that would
strand it."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from substantial import Conductor
from substantial.testing import load_histories, replay

from .conftest import Store, one_error_line

V1 = """
from substantial import Context, workflow


@workflow(name="order")
async def order(c: Context, item: str = "book") -> str:
    reserved = await c.save(lambda: f"reserved {item}", name="reserve")
    decision = await c.receive("go")
    return f"{reserved}: {decision}"
"""

V2 = """
from substantial import Context, workflow


@workflow(name="order")
async def order(c: Context, item: str = "book") -> str:
    reserved = await c.save(lambda: f"reserved {item}", name="reserve")
    await c.save(lambda: "fraud checked", name="fraud_check")
    decision = await c.receive("go")
    return f"{reserved}: {decision}"
"""


def write_module(tmp: Path, name: str, source: str) -> ModuleType:
    path = tmp / f"{name}.py"
    path.write_text(textwrap.dedent(source).lstrip())
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def suspended(sqlite_store: Store) -> tuple[Store, str, ModuleType]:
    """A run of flow_v1's ``order`` waiting for "go" (its reservation recorded)."""
    v1 = write_module(sqlite_store.tmp, "flow_v1", V1)
    write_module(sqlite_store.tmp, "flow_v2", V2)
    c = Conductor(sqlite_store.url)
    c.register(v1.order)
    try:
        h = await c.start(v1.order, {"item": "lamp"})
        await c.run_until_idle(hot_wait=0)  # the receive suspends at once
        assert str(await h.status()) == "SUSPENDED"
    finally:
        await c.close()
    return sqlite_store, h.run_id, v1


async def test_unchanged_code_replays_every_unfinished_run_and_exits_0(
    suspended: tuple[Store, str, ModuleType],
) -> None:
    store, _, _ = suspended
    proc = store.cli("replay-check", "flow_v1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "1 unfinished runs replayed, 0 diverge" in proc.stderr


async def test_changed_code_under_a_suspended_run_exits_1_naming_the_call_and_line(
    suspended: tuple[Store, str, ModuleType],
) -> None:
    store, run_id, _ = suspended
    proc = store.cli("replay-check", "flow_v2")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    [line] = proc.stdout.splitlines()
    assert line.startswith(f"{run_id} (order): ")
    assert "save(step='fraud_check') at flow_v2.py:7" in line  # the new code's call, where
    assert "receive('go') at flow_v1.py:7" in line  # what the log recorded there
    doc = json.loads(store.cli("replay-check", "flow_v2", "--json").stdout)
    [bad] = doc["diverged"]
    assert doc["checked"] == 1 and bad["run_id"] == run_id and bad["step"] == 1
    assert bad["code"] == "save(step='fraud_check') at flow_v2.py:7"
    assert bad["recorded"] == "receive('go') at flow_v1.py:7"


async def test_replay_check_of_a_workflow_the_app_lacks_is_a_usage_error(
    suspended: tuple[Store, str, ModuleType],
) -> None:
    store, _, _ = suspended
    proc = store.cli("replay-check", "flow_v1", "--workflow", "nope")
    assert proc.returncode == 2
    assert "has no workflow 'nope' (it has: order)" in one_error_line(proc)


async def test_an_exported_history_replays_in_a_test_against_either_version(
    suspended: tuple[Store, str, ModuleType],
) -> None:
    store, run_id, v1 = suspended
    out = store.tmp / "order.json"
    store.ok("export", run_id, "-o", str(out))
    [history] = load_histories(out)
    assert history.run_id == run_id and history.workflow == "order"
    assert [r["k"] for r in history.records][:2] == ["start", "call"]
    replayed = await replay(out, v1.order)
    assert (replayed.calls, replayed.outcome) == (2, "waiting")
    v2 = write_module(store.tmp, "flow_v2_again", V2)
    with pytest.raises(Exception, match=r"save\(step='fraud_check'\) at flow_v2_again.py:7"):
        await replay(out, v2.order)
    assert json.loads(store.ok("export", run_id))["runs"][0]["run_id"] == run_id


def test_export_of_an_unknown_run_is_a_usage_error(sqlite_store: Store) -> None:
    proc = sqlite_store.cli("export", "no-such-run")
    assert proc.returncode == 2
    assert "no-such-run" in one_error_line(proc)
