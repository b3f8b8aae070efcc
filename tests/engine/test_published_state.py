"""Published state: ``c.publish(key, value)`` and ``handle.state(key)``. A run's
latest values are read from outside without waking it, written once however
often the run replays, kept one per key by compaction, shown in the history,
followed across continue_using, and searchable with ``{"state": {key: term}}``;
on every store."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import pytest

from substantial import Context, FilterError, RunStatus, workflow
from substantial.backends import Backend
from substantial.backends.memory import MemoryBackend
from substantial.filters import compile_filter
from substantial.testing import TestEnvironment

from .helpers import eventually


@workflow()
async def onboarding(c: Context, customer: str, steps: int = 3) -> str:
    await c.publish("customer", customer)
    for i in range(steps):
        await c.save(functools.partial(str, f"step {i}"), name="step", key="step")
        await c.publish("progress", {"done": i + 1, "of": steps})
        await c.sleep(timedelta(days=1), key="wait")
        await c.compact()
    await c.receive("finish")
    return "onboarded"


def state_records(records: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(r["name"], r["v"]) for r in records if r["k"] == "state"]


async def test_state_is_read_from_outside_without_waking_the_run(backend: Backend) -> None:
    async with TestEnvironment(onboarding, backend=backend) as env:
        h = await env.conductor.start(onboarding, {"customer": "acme"})
        await env.run_until_idle()  # step 0 done, asleep for a day
        before = await env.conductor.journal.get(h.run_id)
        assert await h.state("customer") == "acme"
        assert await h.state("progress") == {"done": 1, "of": 3}
        assert await h.state("missing", "none yet") == "none yet"
        after = await env.conductor.journal.get(h.run_id)
        assert after.status == RunStatus.SUSPENDED and after.log_len == before.log_len
        assert after.lease_token == before.lease_token  # nobody claimed it to answer

        await env.advance(timedelta(days=3))  # three rounds, a replay each (evicted)
        assert await h.state("progress") == {"done": 3, "of": 3}
        _, records = await env.conductor.journal.read_log(h.run_id)
        assert state_records(records) == [  # compacted: the latest value of each key
            ("customer", "acme"),
            ("progress", {"done": 3, "of": 3}),
        ]
        kinds = [(e.kind, e.name) for e in await env.history(h.run_id)]
        assert ("publish", "customer") in kinds and ("publish", "progress") in kinds
        await h.send("finish")
        assert await h.result(timeout=30) == "onboarded"


@workflow()
async def no_compaction(c: Context) -> int:
    for i in range(3):
        await c.publish("round", i)
        await c.sleep(timedelta(hours=1))
    return 3


async def test_a_replay_never_writes_a_published_value_again(backend: Backend) -> None:
    async with TestEnvironment(no_compaction, backend=backend) as env:
        h = await env.conductor.start(no_compaction)
        assert await h.result(timeout=30) == 3  # three evictions, three replays
        _, records = await env.conductor.journal.read_log(h.run_id)
        assert state_records(records) == [("round", 0), ("round", 1), ("round", 2)]


async def test_runs_are_found_by_what_they_published(backend: Backend) -> None:
    async with TestEnvironment(onboarding, backend=backend) as env:
        runs = {
            customer: await env.conductor.start(onboarding, {"customer": customer, "steps": 1})
            for customer in ("acme", "globex", "acme-eu")
        }
        await env.run_until_idle()
        found = await env.conductor.search("onboarding", {"state": {"customer": {"eq": "acme"}}})
        assert [s.run_id for s in found] == [runs["acme"].run_id]
        assert found[0].state["customer"] == "acme"
        prefix = await env.conductor.search(
            "onboarding",
            {
                "and": [
                    {"state": {"customer": {"contains": "acme"}}},
                    {"status": {"eq": "SUSPENDED"}},
                ]
            },
        )
        assert {s.run_id for s in prefix} == {runs["acme"].run_id, runs["acme-eu"].run_id}
        none = await env.conductor.search("onboarding", {"state": {"nothing": {"eq": 1}}})
        assert none == []


async def test_a_search_by_state_reads_no_log_and_is_pushed_down() -> None:
    """The store keeps each run's latest published values with the run: a search
    by them lists runs (filtered in the store where it can) and reads no log."""
    backend = MemoryBackend()
    async with TestEnvironment(onboarding, backend=backend) as env:
        for customer in ("acme", "globex", "initech"):
            await env.conductor.start(onboarding, {"customer": customer, "steps": 1})
        await env.run_until_idle()
        reads = {op: backend.calls.get(op, 0) for op in ("read", "read_log_page")}
        found = await env.conductor.search(
            "onboarding",
            {"and": [{"state": {"customer": {"eq": "acme"}}}, {"status": {"eq": "SUSPENDED"}}]},
        )
        assert [s.state["customer"] for s in found] == ["acme"]
        assert {op: backend.calls.get(op, 0) for op in reads} == reads


@workflow()
async def first_leg(c: Context) -> None:
    await c.publish("leg", 1)
    await c.publish("origin", "first")
    await c.continue_using("second_leg", {})


@workflow()
async def second_leg(c: Context) -> str:
    await c.publish("leg", 2)
    await c.receive("done")
    return "arrived"


async def test_state_follows_a_continue_using_chain() -> None:
    async with TestEnvironment(first_leg, second_leg) as env:
        h = await env.conductor.start(first_leg)

        async def continued() -> bool:
            return bool(await h.state("leg") == 2)

        await eventually(continued)
        assert await h.states() == {"leg": 2, "origin": "first"}


@pytest.mark.parametrize(
    ("expr", "path"),
    [
        ({"state": "customer"}, "state"),
        ({"state": {"a": {"eq": 1}, "b": {"eq": 2}}}, "state"),
        ({"state": {"customer": {"like": "x"}}}, "state.customer"),
        ({"not": {"state": {"": {"eq": 1}}}}, "not.state"),
    ],
)
def test_a_malformed_state_term_names_its_path(expr: dict[str, Any], path: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(expr)
    assert info.value.path == path


async def test_a_key_must_be_a_non_empty_string() -> None:
    @workflow(name="bad_key")
    async def bad_key(c: Context) -> str:
        try:
            await c.publish("", 1)
        except ValueError as exc:
            return str(exc)
        return "accepted"

    async with TestEnvironment(bad_key) as env:
        h = await env.conductor.start(bad_key)
        assert "non-empty string" in await h.result(timeout=10)
