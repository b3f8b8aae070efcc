"""Retries, bad input and determinism: errors land on the run or the caller, never the worker."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from substantial import (
    Conductor,
    Context,
    NonDeterminismError,
    PayloadTooLarge,
    Retry,
    RunFailed,
    RunFinished,
    RunNotFound,
    RunStatus,
    SaveFailed,
    SerializationError,
    SubstantialError,
    workflow,
)
from substantial._journal import decode_record

from .helpers import eventually, worker

attempts: list[float] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    attempts.clear()


def flaky() -> str:
    attempts.append(time.time())  # the worker's clock
    raise ConnectionError(f"attempt {len(attempts)} failed")


POLICY = Retry(max_attempts=4, backoff=timedelta(milliseconds=50), factor=2.0)


@workflow()
async def retrying(c: Context, max_attempts: int) -> str:
    try:
        await c.save(flaky, retry=dataclasses.replace(POLICY, max_attempts=max_attempts))
    except SaveFailed as exc:
        return f"{exc.error_type}: {exc} after {exc.attempts}"
    return "unreachable"


@pytest.mark.parametrize("hot_wait", [0.0, 5.0], ids=["evicted", "in-place"])
async def test_retries_run_exactly_max_attempts_after_their_recorded_backoffs(
    conductor: Conductor, hot_wait: float
) -> None:
    conductor.register(retrying)
    async with worker(conductor, hot_wait=hot_wait):
        h = await conductor.start(retrying, {"max_attempts": 4})
        assert await h.result(timeout=20) == "ConnectionError: attempt 4 failed after 4"
    assert len(attempts) == 4
    snap = await conductor.backend.read(h.run_id)
    assert snap is not None
    log = [decode_record(h.run_id, i, data) for i, data in enumerate(snap.log)]
    tries = [r for r in log if r["k"] == "try"]
    assert [r["n"] for r in tries] == [1, 2, 3]  # one record per failed attempt
    assert [r["err"]["msg"] for r in tries] == [f"attempt {n} failed" for n in (1, 2, 3)]
    for n, (tried, rec) in enumerate(zip(attempts, tries, strict=False), start=1):
        # each retry is due at least the policy's growing delay after its attempt...
        assert rec["retry"] - tried >= POLICY.delay_after(n)
        # ...and the next attempt waited for that recorded time
        assert attempts[n] >= rec["retry"]
    assert POLICY.delay_after(1) < POLICY.delay_after(2) < POLICY.delay_after(3)


@workflow()
async def non_retryable(c: Context) -> None:
    await c.save(flaky, retry=Retry(max_attempts=5, non_retryable=(ConnectionError,)))


async def test_non_retryable_errors_fail_at_once(conductor: Conductor) -> None:
    conductor.register(non_retryable)
    async with worker(conductor):
        h = await conductor.start(non_retryable)
        with pytest.raises(RunFailed, match="attempt 1 failed"):
            await h.result(timeout=10)
    assert len(attempts) == 1


@workflow()
async def save_timeout(c: Context) -> str:
    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    try:
        await c.save(slow, timeout=0.1, retry=Retry(max_attempts=2, backoff=timedelta(0)))
    except SaveFailed as exc:
        return exc.error_type
    return "no timeout"


async def test_save_timeout_counts_as_a_failed_attempt(conductor: Conductor) -> None:
    conductor.register(save_timeout)
    async with worker(conductor):
        h = await conductor.start(save_timeout)
        assert await h.result(timeout=10) == "TimeoutError"


@workflow()
async def logging_wf(c: Context) -> int:
    c.log.info("starting", n=1)
    await c.sleep(0.01)
    await c.log.warn("middle")
    await c.sleep(0.01)
    c.log.error("done", ok=True)
    return 1


async def test_logs_are_recorded_once_despite_replays(conductor: Conductor) -> None:
    conductor.register(logging_wf)
    async with worker(conductor, hot_wait=0):
        h = await conductor.start(logging_wf)
        assert await h.result(timeout=10) == 1
    logs = await h.logs()
    assert [(r.level, r.message, r.fields) for r in logs] == [
        ("info", "starting", {"n": 1}),
        ("warn", "middle", {}),
        ("error", "done", {"ok": True}),
    ]


@workflow()
async def non_json(c: Context) -> None:
    await c.save(lambda: object())


async def test_non_json_value_fails_the_run_naming_the_call(conductor: Conductor) -> None:
    conductor.register(non_json)
    async with worker(conductor):
        h = await conductor.start(non_json)
        with pytest.raises(RunFailed) as err:
            await h.result(timeout=10)
    msg = str(err.value)
    assert "save()" in msg and "test_failures.py" in msg and "JSON" in msg


async def test_start_with_non_json_kwargs_is_refused(conductor: Conductor) -> None:
    with pytest.raises(SerializationError, match="kwargs"):
        await conductor.start("anything", {"x": object()})


flip = {"branch": "save"}


@workflow()
async def shifty(c: Context) -> str:
    if flip["branch"] == "save":
        await c.save(lambda: 1)
    else:
        await c.sleep(0.01)
    await c.receive("go")
    return "done"


async def test_non_deterministic_replay_fails_with_a_determinism_message(
    conductor: Conductor,
) -> None:
    flip["branch"] = "save"
    conductor.register(shifty)
    async with worker(conductor, hot_wait=0):
        h = await conductor.start(shifty)
        await eventually(lambda: _is(h, RunStatus.SUSPENDED))
        flip["branch"] = "sleep"  # the code changed under a run in flight
        await h.send("go")
        with pytest.raises(RunFailed) as err:
            await h.result(timeout=10)
    msg = str(err.value)
    assert "non-deterministic" in msg and "sleep()" in msg and "save()" in msg
    assert "test_failures.py:" in msg


async def _is(h: object, status: RunStatus) -> bool:
    return await h.status() == status  # type: ignore[attr-defined, no-any-return]


def test_non_determinism_error_carries_fields() -> None:
    e = NonDeterminismError(run_id="r", step=2, expected="sleep()", recorded="save()")
    assert (e.run_id, e.step, e.expected, e.recorded) == ("r", 2, "sleep()", "save()")
    assert isinstance(e, SubstantialError)


@workflow()
async def wait_for_go(c: Context) -> str:
    await c.save(lambda: "recorded")
    await c.receive("go")
    return "ok"


async def test_a_corrupt_log_record_fails_that_run_only(conductor: Conductor) -> None:
    backend: Any = conductor.backend  # every store has a corrupt() test helper
    conductor.register(wait_for_go)
    async with worker(conductor, hot_wait=0):
        bad = await conductor.start(wait_for_go)
        good = await conductor.start(wait_for_go)
        await eventually(lambda: _is(bad, RunStatus.SUSPENDED))
        await eventually(lambda: _is(good, RunStatus.SUSPENDED))
        before = await backend.read(bad.run_id)
        res = backend.corrupt(bad.run_id, 1, b'{"k": "call", "s": 0, tru')
        if asyncio.iscoroutine(res):
            await res
        await bad.send("go")
        await good.send("go")
        assert await good.result(timeout=10) == "ok"
        with pytest.raises(RunFailed, match="corrupt"):
            await bad.result(timeout=10)
    after = await backend.read(bad.run_id)
    assert before is not None and after is not None
    assert len(after.log) > len(before.log)  # nothing removed; the failure was appended
    assert after.log[0] == before.log[0]


async def test_send_to_an_unknown_run_raises_run_not_found(conductor: Conductor) -> None:
    with pytest.raises(RunNotFound, match="ghost"):
        await conductor.handle("ghost").send("x", 1)


async def test_send_to_a_finished_run_raises(conductor: Conductor) -> None:
    conductor.register(wait_for_go)
    async with worker(conductor):
        h = await conductor.start(wait_for_go)
        await h.send("go")
        await h.result(timeout=10)
        with pytest.raises(RunFinished, match="COMPLETED"):
            await h.send("go")


async def test_oversize_event_is_refused_to_the_caller(conductor: Conductor) -> None:
    async with Conductor(conductor.backend, max_payload_bytes=1000) as small:
        small.register(wait_for_go)
        await _oversize_event(small)


async def _oversize_event(small: Conductor) -> None:
    async with worker(small):
        h = await small.start(wait_for_go)
        with pytest.raises(PayloadTooLarge, match="1000"):
            await h.send("go", "x" * 5000)
        await h.send("go", "small")
        assert await h.result(timeout=10) == "ok"


@workflow()
async def big_result(c: Context) -> int:
    await c.save(lambda: "y" * 5000)
    return 1


async def test_oversize_save_fails_that_run(conductor: Conductor) -> None:
    async with Conductor(conductor.backend, max_payload_bytes=1000) as small:
        small.register(big_result, wait_for_go)
        await _oversize_save(small)


async def _oversize_save(small: Conductor) -> None:
    async with worker(small):
        other = await small.start(wait_for_go)
        h = await small.start(big_result)
        with pytest.raises(RunFailed, match="over the limit"):
            await h.result(timeout=10)
        await other.send("go")
        assert await other.result(timeout=10) == "ok"


async def test_runs_of_unregistered_workflows_stay_pending(conductor: Conductor) -> None:
    conductor.register(wait_for_go)
    async with worker(conductor):
        h = await conductor.start("nobody_knows_me", {"a": 1})
        ok = await conductor.start(wait_for_go)
        await ok.send("go")
        assert await ok.result(timeout=10) == "ok"
        assert await h.status() == RunStatus.PENDING
        [summary] = await conductor.search("nobody_knows_me")
        assert summary.status == RunStatus.PENDING and summary.error is None


@workflow()
async def looks_up_an_address(c: Context) -> str:
    customer = await c.save(lambda: {"name": "Ada"})
    return str(customer["address"])  # the failing line


FAILING_LINE = next(
    i
    for i, line in enumerate(Path(__file__).read_text().splitlines(), start=1)
    if line.endswith("# the failing line")
)


async def test_a_failed_run_keeps_its_error_type_and_the_workflow_traceback(
    conductor: Conductor, caplog: pytest.LogCaptureFixture
) -> None:
    conductor.register(looks_up_an_address)
    with caplog.at_level(logging.WARNING, logger="substantial"):
        async with worker(conductor):
            h = await conductor.start(looks_up_an_address)
            with pytest.raises(RunFailed, match="address"):
                await h.result(timeout=10)
    snap = await conductor.backend.read(h.run_id)
    assert snap is not None
    end = decode_record(h.run_id, len(snap.log) - 1, snap.log[-1])
    assert end["err"]["type"] == "KeyError" and end["err"]["msg"] == "'address'"
    tb = end["err"]["tb"]
    assert f'test_failures.py", line {FAILING_LINE}, in looks_up_an_address' in tb
    assert tb.rstrip().endswith("KeyError: 'address'")
    assert f"{os.sep}substantial{os.sep}" not in tb  # only the user's frames
    [warning] = [r for r in caplog.records if h.run_id in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "KeyError" in warning.getMessage() and f"line {FAILING_LINE}" in warning.getMessage()
    run = await conductor.backend.get_run(h.run_id)  # the run row has the type too
    assert run is not None and run.error_type == "KeyError"
