"""RedisBackend specifics the conformance suite cannot see: precision, index, retries, hints."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from substantial import RunStatus
from substantial.backends import NewRun, RunQuery, RunUpdate
from substantial.backends.redis import RedisBackend, _cmd, redact
from substantial.errors import BackendUnavailable, LeaseLost
from tests.backends import REDIS_URL, unavailable

T0 = 1_700_000_000.0


def _new(
    run_id: str,
    *,
    wf: str = "wf",
    due: float | None = T0,
    created: float = T0,
    queue: str = "default",
) -> NewRun:
    return NewRun(
        run_id=run_id, workflow=wf, queue=queue, first_record=b"{}", created_at=created, due_at=due
    )


@pytest.fixture
async def rb() -> AsyncIterator[RedisBackend]:
    b = RedisBackend(REDIS_URL, prefix=f"subtest-{uuid.uuid4().hex[:12]}")
    try:
        await b.open()
    except Exception as exc:
        unavailable("redis", exc)
    try:
        yield b
    finally:
        await b.drop_everything()
        await b.close()


async def _keys(b: RedisBackend, kind: str = "") -> list[str]:
    pattern = "{" + b._prefix + "}:" + kind + "*"
    return [k.decode() async for k in b._require().scan_iter(match=pattern)]


async def _claim(
    b: RedisBackend,
    *,
    now: float = T0,
    wfs: tuple[str, ...] = ("wf",),
    limit: int = 1,
    lease: float = 10.0,
) -> list[str]:
    cs = await b.claim_due(
        queue="default", workflows=wfs, limit=limit, owner="w", lease_seconds=lease, now=now
    )
    return [c.run_id for c in cs]


async def test_timestamps_keep_full_double_precision(rb: RedisBackend) -> None:
    now = 1_712_345_678.123456789  # more digits than Lua's tostring keeps
    await rb.create_run(_new("r", due=now, created=now + 1e-6))
    assert await _claim(rb, now=now, lease=0.1234567) == ["r"]
    run = await rb.get_run("r")
    assert run is not None
    assert run.due_at == now and run.created_at == now + 1e-6 and run.started_at == now
    assert run.lease_expires_at == now + 0.1234567
    assert await _claim(rb, now=now + 0.1234567) == ["r"]  # expiry compares exactly


async def test_unregistered_workflows_never_starve_claims(rb: RedisBackend) -> None:
    for i in range(300):
        await rb.create_run(_new(f"x{i}", wf="unknown", due=T0 - 100))
    await rb.create_run(_new("mine", due=T0))
    assert await _claim(rb, limit=5) == ["mine"]


async def test_claim_merges_workflows_in_due_order(rb: RedisBackend) -> None:
    await rb.create_run(_new("a3", wf="a", due=T0 - 3))
    await rb.create_run(_new("b2", wf="b", due=T0 - 2))
    await rb.create_run(_new("a1", wf="a", due=T0 - 1))
    await rb.create_run(_new("b4", wf="b", due=T0 - 4))
    assert await _claim(rb, wfs=("a", "b", "a"), limit=3) == ["b4", "a3", "b2"]


async def test_delivery_to_a_leased_run_waits_for_the_lease(rb: RedisBackend) -> None:
    await rb.create_run(_new("r"))
    assert await _claim(rb, lease=10) == ["r"]
    await rb.deliver("r", b"x", now=T0 + 1)
    assert await _claim(rb, now=T0 + 5) == []
    assert await _claim(rb, now=T0 + 10) == ["r"]
    # an expired lease with a later delivery: due at the delivery, not at the expiry
    await rb.deliver("r", b"y", now=T0 + 30)
    assert await _claim(rb, now=T0 + 25) == []
    assert await _claim(rb, now=T0 + 30) == ["r"]


async def test_terminal_update_without_release_clears_lease_and_index(rb: RedisBackend) -> None:
    await rb.create_run(_new("r"))
    await _claim(rb)
    await rb.request_cancel("r", now=T0)
    await rb.append(
        "r",
        token=1,
        expected_len=1,
        records=[],
        update=RunUpdate(status=RunStatus.CANCELLED, ended_at=T0),
        now=T0,
    )
    run = await rb.get_run("r")
    assert run is not None and run.status == RunStatus.CANCELLED
    assert run.due_at is None and run.lease_owner is None and run.result is None
    await rb.request_cancel("r", now=T0)  # no-op on a terminal run
    assert await _claim(rb, now=T0 + 100) == []
    assert await _keys(rb, "due") == []


async def test_release_with_cancel_pending_is_due_now(rb: RedisBackend) -> None:
    await rb.create_run(_new("r"))
    await _claim(rb)
    await rb.request_cancel("r", now=T0 + 1)
    assert await rb.release("r", token=1, due_at=T0 + 50, status=RunStatus.SUSPENDED, now=T0 + 2)
    run = await rb.get_run("r")
    assert run is not None and run.due_at == T0 + 2 and run.cancel_requested


async def test_result_none_and_unset_and_json(rb: RedisBackend) -> None:
    await rb.create_run(_new("r"))
    await _claim(rb)
    n = await rb.append(
        "r",
        token=1,
        expected_len=1,
        records=[b"a"],
        update=RunUpdate(result={"é": [1, 2.5, None, "x"]}),
        now=T0,
    )
    run = await rb.get_run("r")
    assert n == 2 and run is not None and run.result == {"é": [1, 2.5, None, "x"]}
    assert run.status == RunStatus.RUNNING and run.lease_owner == "w"  # no release


async def test_list_runs_pages_orders_and_filters(rb: RedisBackend) -> None:
    for i in range(450):
        await rb.create_run(
            _new(f"r{i:03d}", wf="wf" if i % 2 else "other", created=T0 + (i // 10))
        )
    runs = await rb.list_runs()  # more than one page, newest first
    assert [r.run_id for r in runs] == [f"r{i:03d}" for i in reversed(range(450))]
    pending = frozenset({RunStatus.PENDING})
    some = await rb.list_runs(RunQuery(workflow="wf", statuses=pending, limit=210))
    assert [r.run_id for r in some] == [f"r{i:03d}" for i in range(449, 29, -2)]
    # a page boundary inside a run of equal created_at: keyset paging skips none
    tail = await rb.list_runs(RunQuery(before=(T0 + 20, "r205"), created_after=T0 + 19))
    assert [r.run_id for r in tail] == [f"r{i:03d}" for i in range(204, 189, -1)]
    assert await rb.list_runs(RunQuery(limit=0)) == []
    assert await rb.list_runs(RunQuery(workflow="nobody")) == []


async def test_keys_share_one_hash_tag_and_drop_removes_them(rb: RedisBackend) -> None:
    await rb.create_run(replace(_new("r", due=None), state={"k": 1}))
    await rb.deliver("r", b"x", now=T0)
    keys = await _keys(rb)
    assert keys and all(k.startswith("{" + rb._prefix + "}:") for k in keys)
    assert await _keys(rb, "state:") == ["{" + rb._prefix + "}:state:r"]
    await rb.drop_everything()
    assert await _keys(rb) == []


async def _publish(b: RedisBackend, run_id: str, at: int, state: dict[str, Any]) -> None:
    update = RunUpdate(state=state)
    await b.append(run_id, token=1, expected_len=at, records=[b"s"], update=update, now=T0)


async def test_published_values_are_kept_as_the_json_python_encoded(rb: RedisBackend) -> None:
    """Lua never re-encodes a value (cjson would print 14 digits and make 1.0 an 1)."""
    await rb.create_run(replace(_new("r"), state={"n": 1.0}))
    await _claim(rb)
    await _publish(rb, "r", 1, {"f": 0.1 + 0.2, "big": 2**63 - 1, "k.with space": None})
    await _publish(rb, "r", 2, {"n": 2})
    stored = await _cmd(rb._require(), "HGETALL", rb._key("state", "r"))
    assert stored == {
        b"n": b"2",
        b"f": b"0.30000000000000004",
        b"big": b"9223372036854775807",
        b"k.with space": b"null",
    }
    run = await rb.get_run("r")
    assert run is not None and run.state == {
        "n": 2,
        "f": 0.1 + 0.2,
        "big": 2**63 - 1,
        "k.with space": None,
    }
    page = await rb.read_log_page("r", start=5, stop=1)
    assert page is not None and page[0].state == run.state and page[1] == []


async def test_a_run_from_before_the_index_stays_without_one(rb: RedisBackend) -> None:
    """No ``st`` on the run hash: its state reads as None, an append writes none (a
    partial index would hide what its log published before), and a search by state
    returns it for the caller to read its log."""
    await rb.create_run(_new("old"))
    await _cmd(rb._require(), "HDEL", rb._key("run", "old"), "st")
    await _claim(rb)
    await _publish(rb, "old", 1, {"customer": "acme"})
    assert await _keys(rb, "state:") == []
    run, snap = await rb.get_run("old"), await rb.read("old")
    page = await rb.read_log_page("old", start=0, stop=2)
    assert run is not None and snap is not None and page is not None
    assert run.state is None and snap.run.state is None and page[0].state is None
    assert snap.log == [b"{}", b"s"] and run.log_len == 2
    found = await rb.list_runs(RunQuery(state_equals=(("customer", "globex"),)))
    assert [r.run_id for r in found] == ["old"]


async def test_state_equals_fills_each_page_and_misses_none(rb: RedisBackend) -> None:
    for i in range(260):
        state = {"c": "acme" if i % 50 == 0 else "other"}
        await rb.create_run(replace(_new(f"r{i:03d}", due=None, created=T0 + i), state=state))
    query = RunQuery(state_equals=(("c", "acme"),), limit=2)
    first = await rb.list_runs(query)
    assert [r.run_id for r in first] == ["r250", "r200"]
    cursor = (first[-1].created_at, first[-1].run_id)
    rest = await rb.list_runs(replace(query, before=cursor, limit=10))
    assert [r.run_id for r in rest] == ["r150", "r100", "r050", "r000"]
    everyone = await rb.list_runs(RunQuery(state_equals=(("c", "other"),)))
    assert len(everyone) == 254 and all(r.state == {"c": "other"} for r in everyone)


async def test_lost_replies_are_not_applied_twice(
    rb: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script ran but the reply was lost: the retry must return the first answer."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    for name in ("create", "append", "deliver", "release"):
        real = rb._scripts[name]
        state = {"failed": False}

        async def flaky(*, keys: Any, args: Any, real: Any = real, state: Any = state) -> Any:
            reply = await real(keys=keys, args=args)
            if not state["failed"]:
                state["failed"] = True
                raise RedisConnectionError("reply lost")
            return reply

        monkeypatch.setitem(rb._scripts, name, flaky)
    assert await rb.create_run(_new("r", due=T0))
    assert await _claim(rb) == ["r"]
    assert await rb.append("r", token=1, expected_len=1, records=[b"a"], now=T0) == 2
    assert await rb.deliver("r", b"x", now=T0) == 1
    assert await rb.release("r", token=1, due_at=None, status=RunStatus.SUSPENDED, now=T0)
    snap = await rb.read("r")
    assert snap is not None and snap.log == [b"{}", b"a"] and len(snap.inbox) == 1
    with pytest.raises(LeaseLost):  # a genuinely stale expectation still fails
        await rb.append("r", token=1, expected_len=1, records=[b"b"], now=T0)


async def test_a_rewrite_whose_reply_was_lost_returns_the_first_answer(
    rb: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    real, calls = rb._scripts["rewrite"], list[Any]()

    async def flaky(*, keys: Any, args: Any) -> Any:
        reply = await real(keys=keys, args=args)
        calls.append(args)
        if len(calls) == 1:
            raise RedisConnectionError("reply lost")
        return reply

    monkeypatch.setitem(rb._scripts, "rewrite", flaky)
    assert await rb.create_run(_new("r", due=T0))
    assert await _claim(rb) == ["r"]
    assert await rb.append("r", token=1, expected_len=1, records=[b"a", b"b"], now=T0) == 3
    assert await rb.rewrite_log("r", token=1, expected_len=3, records=[b"x"], now=T0) == 1
    assert len(calls) == 2  # the retry landed on the stored nonce, not on the length check
    snap = await rb.read("r")
    assert snap is not None and snap.log == [b"x"] and snap.run.log_len == 1


async def test_unreachable_server_never_leaks_the_password() -> None:
    b = RedisBackend("redis://alice:s3cr%40t@127.0.0.1:1/0?password=qs-secret", prefix="p")
    with pytest.raises(BackendUnavailable) as info:
        await b.open()
    text = str(info.value)
    assert "s3cr" not in text and "qs-secret" not in text and "127.0.0.1:1" in text
    await b.close()
    await b.close()  # idempotent
    assert redact("redis://:pw@h:6379/2?password=pw") == "redis://***@h:6379/2"


async def test_operation_retries_then_raises_backend_unavailable(
    rb: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    monkeypatch.setattr("substantial.backends.redis._RETRY_DELAYS", (0.0, 0.0))
    attempts = 0

    async def down(*, keys: Any, args: Any) -> Any:
        nonlocal attempts
        attempts += 1
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379.")

    monkeypatch.setitem(rb._scripts, "renew", down)
    with pytest.raises(BackendUnavailable):
        await rb.renew({"r": 1}, lease_seconds=1, now=T0)
    assert attempts == 3


# -- a private server, restarted under a live subscription ----------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(port: int, tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def _wait_up(port: int) -> None:
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            await w.wait_closed()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def test_subscription_survives_a_server_restart(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:  # skipped locally, a failure in CI
        unavailable("redis-server", FileNotFoundError("redis-server is not on PATH"))
    port = _free_port()
    b = RedisBackend(f"redis://127.0.0.1:{port}/0", prefix="restart")
    with _server(port, tmp_path):
        await _wait_up(port)
        await b.open()
        await b.create_run(_new("r", due=None))
        stream = b.subscribe()
        assert await asyncio.wait_for(stream.__anext__(), 5) == ""  # subscribed
        await b.deliver("r", b"x", now=T0)
        assert await asyncio.wait_for(stream.__anext__(), 5) == "r"
        nxt = asyncio.ensure_future(stream.__anext__())
    with pytest.raises(BackendUnavailable):
        await b.get_run("r")
    with _server(port, tmp_path):
        await _wait_up(port)
        assert await asyncio.wait_for(nxt, 10) == ""  # reconnected: something may have changed
        await b.create_run(_new("r2", due=None))  # scripts reloaded after the restart
        assert await asyncio.wait_for(stream.__anext__(), 5) == "r2"
        await stream.aclose()  # type: ignore[attr-defined]
        await b.close()


async def test_cancelling_a_fresh_subscription_is_prompt(rb: RedisBackend) -> None:
    """redis-py may swallow a cancel racing its read timeout; the stream must still stop."""

    async def listen() -> None:
        async for _ in rb.subscribe():
            pass

    for delay in (0.0, 0.001, 0.01, 0.2):
        task = asyncio.create_task(listen())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 3)


async def _forget_counts(b: RedisBackend, run_ids: list[str]) -> None:
    """Make the store look as if written before the counters existed."""
    client, tag = b._require(), "{" + b._prefix + "}"
    await _cmd(client, "DEL", f"{tag}:counts", f"{tag}:counted")
    for rid in run_ids:
        await _cmd(client, "HDEL", f"{tag}:run:{rid}", "counted")


async def test_runs_written_before_the_counters_are_counted_once(rb: RedisBackend) -> None:
    ids = [f"r{i:04d}" for i in range(2500)]  # more than one ZSCAN batch
    for i in range(0, len(ids), 250):
        await asyncio.gather(*(rb.create_run(_new(rid)) for rid in ids[i : i + 250]))
    await rb.create_run(_new("x", wf="other"))
    assert await _claim(rb) == ["r0000"]  # RUNNING
    await _forget_counts(rb, [*ids, "x"])
    # An older run changed by this version before the first count: counted by the change.
    assert await _claim(rb) == ["r0001"]

    expected = {("wf", RunStatus.PENDING): 2498, ("wf", RunStatus.RUNNING): 2,
                ("other", RunStatus.PENDING): 1}  # fmt: skip
    assert await rb.count_runs() == expected
    assert await rb.count_runs() == expected  # counted once: the walk ran once
    assert await _claim(rb, limit=3) == ["r0002", "r0003", "r0004"]
    assert (await rb.count_runs())[("wf", RunStatus.RUNNING)] == 5


async def test_a_status_changed_behind_the_counters_is_recounted_on_its_next_change(
    rb: RedisBackend,
) -> None:
    """A run changed by an older version (no counter update) moves to the right
    counter the next time this version touches it."""
    await rb.create_run(_new("r1"))
    await rb.count_runs()
    key = "{" + rb._prefix + "}:run:r1"
    await _cmd(rb._require(), "HSET", key, "status", "SUSPENDED")  # an older worker
    assert await rb.count_runs() == {("wf", RunStatus.PENDING): 1}  # not seen yet
    assert await _claim(rb) == ["r1"]
    assert await rb.count_runs() == {("wf", RunStatus.RUNNING): 1}
