"""``substantial.testing.replay``: a recorded history against today's code, with no
effects. The golden histories of the examples (tests/testing/golden, written by
``python -m tests.testing.golden.make``) replay against the examples as they are:
a change to an example that would strand its runs in flight fails here."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from substantial import ClientError, Context, NonDeterminismError, Retry, workflow
from substantial.testing import Replayed, TestEnvironment, load_histories, replay

from .golden import HERE as GOLDEN
from .golden import example

quickstart = example("quickstart")
readme_ws = example("readme_ws")

effects: list[str] = []


@pytest.mark.parametrize(
    ("name", "wf", "outcome", "calls"),
    [
        ("readme-ended", readme_ws.example, "ended", 6),
        ("readme-waiting", readme_ws.example, "waiting", 4),
        ("quickstart-order", quickstart.order, "ended", 13),
    ],
)
async def test_the_golden_histories_of_the_examples_replay_against_their_code(
    name: str, wf: Any, outcome: str, calls: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    effects_file = tmp_path / ".substantial" / "effects.log"  # where quickstart's go
    monkeypatch.chdir(tmp_path)
    replayed = await replay(GOLDEN / f"{name}.json", wf)
    assert (replayed.outcome, replayed.calls) == (outcome, calls)
    assert not effects_file.exists()  # no effect ran


@workflow(name="pay")
async def pay(c: Context, amount: int) -> str:
    def charge() -> str:
        effects.append("charge")
        return f"charged {amount}"

    receipt = await c.save(charge, name="charge")
    await c.receive("shipped")
    return receipt


RECEIVE_LINE = 1 + Path(__file__).read_text().splitlines().index('    await c.receive("shipped")')


@workflow(name="pay")
async def pay_with_check(c: Context, amount: int) -> str:
    def charge() -> str:
        effects.append("charge")
        return f"charged {amount}"

    await c.save(lambda: effects.append("check"), name="check")
    receipt = await c.save(charge, name="charge")
    await c.receive("shipped")
    return receipt


@workflow(name="pay")
async def pay_other_result(c: Context, amount: int) -> str:
    receipt = await c.save(lambda: f"charged {amount}", name="charge")
    await c.receive("shipped")
    return receipt.upper()


async def history_of(wf: Any, *, ship: bool) -> dict[str, Any]:
    async with TestEnvironment(wf) as env:
        h = await env.conductor.start(wf, {"amount": 5}, run_id="p1")
        if ship:
            await h.send("shipped")
            await h.result(timeout=10)
        else:
            await env.run_until_idle()
        doc: dict[str, Any] = orjson.loads((await env.conductor.export(["p1"])).dumps())
        return doc


async def test_a_waiting_run_replays_to_its_wait_without_running_an_effect() -> None:
    doc = await history_of(pay, ship=False)
    effects.clear()
    replayed = await replay(doc, pay)
    assert (replayed.run_id, replayed.calls, replayed.outcome) == ("p1", 2, "waiting")
    assert effects == []


async def test_a_new_call_before_a_recorded_one_is_the_first_divergence() -> None:
    doc = await history_of(pay, ship=False)
    effects.clear()
    with pytest.raises(NonDeterminismError) as info:
        await replay(doc, pay_with_check)
    err = info.value  # a save's explicit name is checked: not silently the charge's value
    assert err.step == 0 and err.expected.startswith("save(step='check') at test_replay.py:")
    assert err.recorded.startswith("save(step='charge') at test_replay.py:")
    assert err.unreached == [f"receive('shipped') at test_replay.py:{RECEIVE_LINE}"]
    assert "Recorded calls never reached: receive('shipped')" in str(err)
    assert effects == []  # the check's effect never ran


async def test_a_different_result_of_a_finished_run_is_a_divergence() -> None:
    doc = await history_of(pay, ship=True)
    assert (await replay(doc, pay)).outcome == "ended"
    with pytest.raises(NonDeterminismError, match=r"return \"CHARGED 5\".*completing with"):
        await replay(doc, pay_other_result)


async def test_replay_works_without_await_in_async_code_too() -> None:
    doc = await history_of(pay, ship=True)
    replayed = replay(doc, pay)  # DESIGN writes it as a plain call
    assert isinstance(replayed, Replayed) and replayed.outcome == "ended"
    assert await replayed is replayed
    with pytest.raises(NonDeterminismError):
        replay(doc, pay_other_result)


def test_replay_is_a_plain_call_in_sync_code() -> None:
    doc = asyncio.run(history_of(pay, ship=True))
    assert replay(doc, pay).outcome == "ended"
    with pytest.raises(NonDeterminismError, match="completing with"):
        replay(doc, pay_other_result)


async def test_a_run_that_failed_replays_when_the_code_fails_the_same_way() -> None:
    @workflow(name="doomed")
    async def doomed(c: Context) -> None:
        def fail() -> None:
            raise KeyError("address")

        await c.save(fail, retry=Retry(max_attempts=1))

    async with TestEnvironment(doomed) as env:
        h = await env.conductor.start(doomed, run_id="d1")
        with pytest.raises(Exception, match="address"):
            await h.result(timeout=10)
        history = await env.conductor.export(["d1"])
    assert (await replay(history, doomed)).outcome == "ended"


async def test_a_history_is_checked_before_it_is_replayed(tmp_path: Path) -> None:
    doc = await history_of(pay, ship=False)
    with pytest.raises(ClientError, match="is of workflow 'pay', not 'doomed_elsewhere'"):
        await replay(doc, workflow(name="doomed_elsewhere")(pay.fn))
    with pytest.raises(ClientError, match="history version 2; this version reads 1"):
        await replay({**doc, "version": 2}, pay)
    with pytest.raises(ClientError, match="not a Substantial history"):
        await replay({"format": "something else"}, pay)
    with pytest.raises(ClientError, match=r"runs\.0\.records"):
        await replay({**doc, "runs": [{**doc["runs"][0], "records": "nope"}]}, pay)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ClientError, match=r"bad\.json is not JSON"):
        await replay(bad, pay)
    with pytest.raises(ClientError, match="cannot read"):
        await replay(tmp_path / "missing.json", pay)
    two = {**doc, "runs": doc["runs"] * 2}
    with pytest.raises(ClientError, match="history of one run"):
        await replay(two, pay)
    assert len(load_histories(two)) == 2
    assert load_histories(doc["runs"][0])[0].run_id == "p1"  # a run on its own
