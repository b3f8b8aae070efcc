"""Every route of the API and each of its status codes, against a real server."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from substantial import RunStatus
from substantial.errors import RunFailed, RunReverted

from ..engine.helpers import eventually
from . import flows
from .conftest import Served

SUMMARY_KEYS = {
    "run_id",
    "workflow",
    "status",
    "queue",
    "parent_id",
    "started_at",
    "ended_at",
    "result",
    "error",
    "error_type",
    "unserved",
}


def error_of(response: Any, status: int, type_: str | None = None) -> str:
    """The error document's message, checking the status and the shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    if type_ is not None:
        assert body["error"]["type"] == type_
    message: str = body["error"]["message"]
    return message


async def start(api: Served, workflow: str, **body: Any) -> str:
    r = await api.client.post("/api/runs", json={"workflow": workflow, **body})
    assert r.status_code == 201, r.text
    run_id: str = r.json()["run_id"]
    return run_id


async def test_start_then_read_a_completed_run(api: Served) -> None:
    run_id = await start(api, "double", kwargs={"n": 21}, run_id="r-1", queue="default")
    assert run_id == "r-1"
    assert await api.conductor.handle(run_id).result(timeout=30) == 42

    r = await api.client.get(f"/api/runs/{run_id}")
    assert r.status_code == 200
    doc = r.json()
    assert set(doc) == SUMMARY_KEYS | {"kwargs", "children"}
    assert doc["status"] == "COMPLETED" and doc["result"] == 42
    assert doc["kwargs"] == {"n": 21} and doc["children"] == []
    assert doc["started_at"].endswith("+00:00") and doc["ended_at"] is not None

    r = await api.client.get(f"/api/runs/{run_id}/logs")
    assert r.status_code == 200
    [line] = r.json()["logs"]
    assert line["message"] == "doubling" and line["fields"] == {"n": 21}
    assert line["level"] == "info" and line["at"].endswith("+00:00")


async def test_start_without_run_id_makes_one(api: Served) -> None:
    r = await api.client.post("/api/runs", json={"workflow": "double"})
    assert r.status_code == 201
    run_id = r.json()["run_id"]
    assert await api.conductor.handle(run_id).result(timeout=30) == 2


async def test_start_an_existing_run_id_answers_200_and_changes_nothing(api: Served) -> None:
    await start(api, "approval", run_id="same")
    r = await api.client.post(
        "/api/runs", json={"workflow": "double", "kwargs": {"n": 5}, "run_id": "same"}
    )
    assert r.status_code == 200 and r.json() == {"run_id": "same"}
    doc = (await api.client.get("/api/runs/same")).json()
    assert doc["workflow"] == "approval" and doc["kwargs"] == {}


async def test_start_refuses_bad_bodies_with_400(api: Served) -> None:
    bad: list[Any] = [
        b"{not json",
        b"[1, 2]",
        b'{"kwargs": {}}',
        b'{"workflow": ""}',
        b'{"workflow": 3}',
        b'{"workflow": "double", "kwargs": [1]}',
        b'{"workflow": "double", "kwargs": "n=1"}',
        b'{"workflow": "double", "run_id": ""}',
        b'{"workflow": "double", "queue": null}',
        b'{"workflow": "double", "colour": "red"}',
        b'{"workflow": "double", "priority": "high"}',
        b'{"workflow": "double", "priority": 2.5}',
        b'{"workflow": "double", "priority": 99999999999}',
        b'{"workflow": "double", "concurrency_key": ""}',
        b'{"workflow": "double", "delay": -1}',
        b'{"workflow": "double", "timeout": "1h"}',
        b'{"workflow": "do\\u0000uble"}',
        b'{"workflow": "\\ud800"}',
        b"",
    ]
    for body in bad:
        r = await api.client.post(
            "/api/runs", content=body, headers={"content-type": "application/json"}
        )
        error_of(r, 400)
    assert (await api.client.get("/api/runs")).json()["runs"] == []


async def test_start_takes_the_flow_control_options(api: Served) -> None:
    await start(
        api, "double", run_id="later", priority=-3, concurrency_key="acme", delay=3600, timeout=7200
    )
    run = await api.conductor.journal.get("later")
    assert (run.priority, run.concurrency_key, run.status) == (-3, "acme", RunStatus.PENDING)
    assert run.due_at is not None and run.due_at - run.created_at == 3600


async def test_unknown_run_is_404_on_every_run_route(api: Served) -> None:
    for method, path in [
        ("GET", "/api/runs/nope"),
        ("GET", "/api/runs/nope/history"),
        ("GET", "/api/runs/nope/logs"),
        ("POST", "/api/runs/nope/events/decision"),
        ("POST", "/api/runs/nope/cancel"),
    ]:
        r = await api.client.request(method, path)
        assert "nope" in error_of(r, 404, "RunNotFound")


async def test_send_an_event_202_then_409_once_finished(api: Served) -> None:
    run_id = await start(api, "approval")
    r = await api.client.post(f"/api/runs/{run_id}/events/decision", json={"ok": True})
    assert r.status_code == 202
    assert await api.conductor.handle(run_id).result(timeout=30) == {"decision": {"ok": True}}

    r = await api.client.post(f"/api/runs/{run_id}/events/decision", json=1)
    error_of(r, 409, "RunFinished")


async def test_send_without_body_delivers_null_and_bad_json_is_400(api: Served) -> None:
    run_id = await start(api, "approval")
    r = await api.client.post(
        f"/api/runs/{run_id}/events/decision",
        content=b"{oops",
        headers={"content-type": "application/json"},
    )
    error_of(r, 400)
    error_of(await api.client.post(f"/api/runs/{run_id}/events/substantial.child:x"), 400)
    r = await api.client.post(f"/api/runs/{run_id}/events/decision")
    assert r.status_code == 202
    assert await api.conductor.handle(run_id).result(timeout=30) == {"decision": None}


async def test_cancel_is_202_and_a_no_op_on_a_finished_run(api: Served) -> None:
    run_id = await start(api, "approval")
    r = await api.client.post(f"/api/runs/{run_id}/cancel")
    assert r.status_code == 202
    handle = api.conductor.handle(run_id)
    try:
        await handle.result(timeout=30)
    except Exception as exc:
        assert type(exc).__name__ == "RunCancelled"
    assert await handle.status() == RunStatus.CANCELLED

    r = await api.client.post(f"/api/runs/{run_id}/cancel", json={})
    assert r.status_code == 202
    assert await handle.status() == RunStatus.CANCELLED


async def test_cancel_bodies(api: Served) -> None:
    run_id = await start(api, "approval")
    for body in ([True], {"revert": "yes"}, {"hard": True}):
        error_of(await api.client.post(f"/api/runs/{run_id}/cancel", json=body), 400)
    assert await api.conductor.handle(run_id).status() != RunStatus.CANCELLED
    r = await api.client.post(f"/api/runs/{run_id}/cancel", json={"revert": False})
    assert r.status_code == 202


async def test_a_run_lists_its_children_and_they_name_their_parent(api: Served) -> None:
    run_id = await start(api, "family", kwargs={"n": 1})
    assert await api.conductor.handle(run_id).result(timeout=30) == [2, 4]
    doc = (await api.client.get(f"/api/runs/{run_id}")).json()
    assert doc["children"] == [f"{run_id}.0", f"{run_id}.1"]
    child = (await api.client.get(f"/api/runs/{run_id}.1")).json()
    assert child["parent_id"] == run_id and child["kwargs"] == {"n": 2}


async def test_workflows_counts_by_status(api: Served) -> None:
    for n in range(3):
        await api.conductor.handle(await start(api, "double", kwargs={"n": n})).result(timeout=30)
    waiting = await start(api, "approval")
    await api.client.post(f"/api/runs/{waiting}/cancel")
    await start(api, "unregistered")  # nobody serves it: it stays PENDING

    r = await api.client.get("/api/workflows")
    assert r.status_code == 200
    found = {w["name"]: w["counts"] for w in r.json()["workflows"]}
    assert set(found) == {w.name for w in flows.ALL} | {"unregistered"}
    assert found["double"]["COMPLETED"] == 3
    assert sum(found["family"].values()) == 0
    assert found["unregistered"]["PENDING"] == 1
    assert set(found["double"]) == {str(s) for s in RunStatus}


async def test_runs_lists_newest_first_with_filters(api: Served) -> None:
    ids = [await start(api, "double", kwargs={"n": n}, run_id=f"d{n}") for n in range(3)]
    for run_id in ids:
        await api.conductor.handle(run_id).result(timeout=30)
    await start(api, "approval", run_id="a0")

    r = await api.client.get("/api/runs")
    assert r.status_code == 200
    body = r.json()
    assert [s["run_id"] for s in body["runs"]] == ["a0", "d2", "d1", "d0"]
    assert body["next_cursor"] is None
    assert all(set(s) == SUMMARY_KEYS for s in body["runs"])

    got = await api.client.get("/api/runs", params={"workflow": "double"})
    assert [s["run_id"] for s in got.json()["runs"]] == ["d2", "d1", "d0"]
    got = await api.client.get("/api/runs", params=[("status", "completed"), ("status", "FAILED")])
    assert [s["run_id"] for s in got.json()["runs"]] == ["d2", "d1", "d0"]
    got = await api.client.get("/api/runs", params={"filter": '{"gte": 2}'})
    assert [s["run_id"] for s in got.json()["runs"]] == ["d2", "d1"]
    got = await api.client.get(
        "/api/runs", params={"filter": '{"run_id": {"eq": "d0"}}', "status": "COMPLETED"}
    )
    assert [s["run_id"] for s in got.json()["runs"]] == ["d0"]


async def test_runs_refuses_bad_parameters_with_400(api: Served) -> None:
    for params in [
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"limit": "100000"},
        {"limit": "²"},
        {"cursor": "not-a-cursor"},
        {"cursor": "WzEsMl0="},  # [1, 2]: JSON, but not a position
        {"status": "SLEEPY"},
        {"filter": "{"},
        {"filter": "[]"},
    ]:
        error_of(await api.client.get("/api/runs", params=params), 400)
    message = error_of(
        await api.client.get("/api/runs", params={"filter": '{"and": [{"eq": 1}, {"nope": 2}]}'}),
        400,
        "FilterError",
    )
    assert "and[1]" in message


async def test_healthz_is_open_and_ok(api: Served) -> None:
    r = await api.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_unknown_routes_and_methods_answer_in_the_error_shape(api: Served) -> None:
    error_of(await api.client.get("/api/nothing"), 404, "NotFound")
    error_of(await api.client.delete("/api/runs"), 405, "MethodNotAllowed")


async def test_input_a_store_cannot_hold_is_400_not_500(any_api: Served) -> None:
    api = any_api
    long_id = "x" * 513
    cases = [
        api.client.post("/api/runs", json={"workflow": "double", "run_id": long_id}),
        api.client.post("/api/runs", json={"workflow": "double", "kwargs": {"k": "a\x00b"}}),
        api.client.post("/api/runs", json={"workflow": "double", "queue": "q\x00"}),
        api.client.get("/api/runs/a%00b"),
        api.client.get(f"/api/runs/{long_id}/logs"),
        api.client.post("/api/runs/a%00b/cancel"),
        api.client.post("/api/runs/r/events/e%00"),
        api.client.get("/api/runs", params={"filter": '{"run_id": {"eq": "a\\u0000"}}'}),
        api.client.get("/api/runs", params={"workflow": "w\x00"}),
        api.client.get("/api/runs", params={"filter": '{"eq": NaN}'}),
        api.client.get("/api/runs", params={"filter": "[" * 5000}),
        api.client.post("/api/runs", json={"workflow": "double", "kwargs": {"n": 2**70}}),
    ]
    for request in cases:
        error_of(await request, 400)
    assert (await api.client.get("/api/runs")).json()["runs"] == []


async def test_racing_starts_of_one_run_id_make_one_run(api: Served) -> None:
    bodies = [{"workflow": "approval", "run_id": "race", "kwargs": {"i": i}} for i in range(8)]
    answers = await asyncio.gather(*(api.client.post("/api/runs", json=b) for b in bodies))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 7 + [201]  # the one start that made it says so
    assert all(r.json() == {"run_id": "race"} for r in answers)
    runs = (await api.client.get("/api/runs")).json()["runs"]
    assert [s["run_id"] for s in runs] == ["race"]


async def test_a_failed_run_shows_its_error_and_type(api: Served) -> None:
    run_id = await start(api, "double", kwargs={"unexpected": 1})
    with contextlib.suppress(RunFailed):
        await api.conductor.handle(run_id).result(timeout=30)
    doc = (await api.client.get(f"/api/runs/{run_id}")).json()
    assert doc["status"] == "FAILED" and doc["error_type"] == "TypeError"
    assert "unexpected" in doc["error"] and doc["result"] is None


async def test_a_continued_run_is_shown_as_itself_and_its_logs_follow(api: Served) -> None:
    run_id = await start(api, "chain", kwargs={"n": 1})
    assert await api.conductor.handle(run_id).result(timeout=30) == "end"
    doc = (await api.client.get(f"/api/runs/{run_id}")).json()
    assert doc["run_id"] == run_id and doc["status"] == "CONTINUED"
    successor = doc["result"]["continued_to"]
    assert (await api.client.get(f"/api/runs/{successor}")).json()["kwargs"] == {"n": 0}
    lines = (await api.client.get(f"/api/runs/{run_id}/logs")).json()["logs"]
    assert [line["fields"] for line in lines] == [{"n": 1}, {"n": 0}]


HISTORY_KEYS = {
    "seq", "kind", "name", "at", "started_at", "duration_ms", "attempts", "error", "value",
}  # fmt: skip


async def test_history_pages_the_timeline_of_a_run(api: Served) -> None:
    run_id = await start(api, "double", kwargs={"n": 2})
    assert await api.conductor.handle(run_id).result(timeout=30) == 4
    r = await api.client.get(f"/api/runs/{run_id}/history")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc) == {"run_id", "entries", "next_cursor"} and doc["run_id"] == run_id
    assert all(set(e) == HISTORY_KEYS for e in doc["entries"])
    kinds = [e["kind"] for e in doc["entries"]]
    assert "save" in kinds and kinds[-1] == "end"
    entries, cursor = [], None
    while True:
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get(f"/api/runs/{run_id}/history", params=params)).json()
        entries += page["entries"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert entries == doc["entries"]
    bad = await api.client.get(f"/api/runs/{run_id}/history", params={"cursor": "nope"})
    error_of(bad, 400)
    error_of(await api.client.get("/api/runs/nobody/history"), 404, "RunNotFound")


async def test_metrics_are_open_and_count_runs(api: Served) -> None:
    run_id = await start(api, "double", kwargs={"n": 1})
    assert await api.conductor.handle(run_id).result(timeout=30) == 2
    r = await api.client.get("/metrics", headers={"authorization": ""})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "substantial_runs_ended_total" in r.text
    assert "substantial_claims_total" in r.text


async def test_cancel_with_revert_runs_the_compensations_newest_first(api: Served) -> None:
    flows.undone.clear()
    run_id = await start(api, "refundable")

    async def waiting() -> bool:
        return await api.conductor.handle(run_id).status() == RunStatus.SUSPENDED

    await eventually(waiting, timeout=30)
    r = await api.client.post(f"/api/runs/{run_id}/cancel", json={"revert": True})
    assert r.status_code == 202, r.text
    with contextlib.suppress(RunReverted):
        await api.conductor.handle(run_id).result(timeout=30)
    assert await api.conductor.handle(run_id).status() == RunStatus.REVERTED
    assert flows.undone == ["b", "a"]


async def test_resume_a_failed_run_after_the_fix(api: Served) -> None:
    flows.broken_step["fail"] = True
    run_id = await start(api, "shipping")
    with contextlib.suppress(RunFailed):
        await api.conductor.handle(run_id).result(timeout=30)
    assert (await api.client.get(f"/api/runs/{run_id}")).json()["error_type"] == "KeyError"
    flows.broken_step["fail"] = False  # the fix is deployed
    r = await api.client.post(f"/api/runs/{run_id}/resume")
    assert r.status_code == 202, r.text
    assert await api.conductor.handle(run_id).result(timeout=30) == "shipped"
    again = await api.client.post(f"/api/runs/{run_id}/resume")
    assert "COMPLETED" in error_of(again, 409, "RunNotResumable")
    error_of(await api.client.post("/api/runs/nobody/resume"), 404, "RunNotFound")


async def test_fork_starts_a_new_run_from_a_step(api: Served) -> None:
    run_id = await start(api, "double", kwargs={"n": 5})
    assert await api.conductor.handle(run_id).result(timeout=30) == 10
    r = await api.client.post(f"/api/runs/{run_id}/fork", json={"from_step": 1})
    assert r.status_code == 201, r.text
    forked = r.json()["run_id"]
    assert forked != run_id
    assert await api.conductor.handle(forked).result(timeout=30) == 10
    for body in ({}, {"from_step": -1}, {"from_step": "1"}, {"from_step": 1, "x": 2}):
        error_of(await api.client.post(f"/api/runs/{run_id}/fork", json=body), 400)
    r = await api.client.post(f"/api/runs/{run_id}/fork", json={"from_step": 1, "run_id": forked})
    error_of(r, 400)  # that id is taken


async def test_workers_lists_the_live_worker(api: Served) -> None:
    r = await api.client.get("/api/workers")
    assert r.status_code == 200
    [w] = r.json()["workers"]
    assert set(w) == {
        "worker_id", "host", "pid", "queues", "workflows", "started_at", "last_beat"
    }  # fmt: skip
    assert "double" in w["workflows"] and w["queues"] == ["default"]
