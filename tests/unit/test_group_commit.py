"""Group commit, as its callers see it: a lone append goes straight to the store;
appends made while one is in flight go together; each append is fenced on its
own inside a batch; a batch that fails is retried one by one, except when the
store is down; an append whose caller gave up before it was sent is never sent.

The store here is the memory store with a batch operation added and a gate that
holds an append in flight, so the tests decide what is in flight when."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from substantial import RunStatus
from substantial._group_commit import GroupCommit
from substantial.backends import Append, RunUpdate
from substantial.backends.memory import MemoryBackend
from substantial.errors import BackendError, BackendUnavailable, LeaseLost

from ..conformance.test_backend_contract import T0, WF, new_run


class GatedBatches(MemoryBackend):
    """The memory store, batching; ``gate`` (when set) holds each call until opened."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.sent: list[list[str]] = []  # run ids per call to the store, in order
        self.fail_batch: Exception | None = None

    async def _held(self, ids: list[str]) -> None:
        self.sent.append(ids)
        if self.gate is not None:
            await self.gate.wait()

    async def append(self, run_id: str, **kw: object) -> int:
        await self._held([run_id])
        return await super().append(run_id, **kw)  # type: ignore[arg-type]

    async def append_batch(self, appends: Sequence[Append]) -> list[int | Exception]:
        await self._held([a.run_id for a in appends])
        if self.fail_batch is not None:
            raise self.fail_batch
        out: list[int | Exception] = []
        for a in appends:
            try:
                out.append(
                    await super().append(
                        a.run_id, token=a.token, expected_len=a.expected_len,
                        records=a.records, update=a.update, now=a.now,
                    )
                )  # fmt: skip
            except (BackendError, LookupError) as exc:
                out.append(exc)
        return out


async def claimed(store: GatedBatches, n: int) -> dict[str, int]:
    for i in range(n):
        await store.create_run(new_run(f"r{i}", first=b"0"))
    claims = await store.claim_due(
        queue="default", workflows=WF, limit=n, owner="w", lease_seconds=60, now=T0
    )
    return {c.run_id: c.token for c in claims}


def op(run_id: str, token: int, records: Sequence[bytes] = (b"x",), length: int = 1) -> Append:
    return Append(run_id=run_id, token=token, expected_len=length, records=records, now=T0)


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


@dataclass
class InFlight:
    """A group over ``n`` claimed runs whose first append (r0's) is held in flight."""

    store: GatedBatches
    tokens: dict[str, int]
    group: GroupCommit
    first: asyncio.Task[int]

    gate: asyncio.Event

    def release(self) -> None:
        """Let the held append (and whatever is sent after it) through."""
        self.gate.set()


async def first_in_flight(n: int, fail_batch: Exception | None = None) -> InFlight:
    store = GatedBatches()
    tokens = await claimed(store, n)
    group = GroupCommit(store)
    store.gate = gate = asyncio.Event()
    store.fail_batch = fail_batch
    first = asyncio.create_task(group.append(op("r0", tokens["r0"])))
    await until(lambda: store.sent == [["r0"]], "the first append is in flight")
    return InFlight(store, tokens, group, first, gate)


async def test_a_lone_append_goes_straight_to_the_store() -> None:
    store = GatedBatches()
    tokens = await claimed(store, 1)
    group = GroupCommit(store)
    assert await group.append(op("r0", tokens["r0"], [b"a", b"b"])) == 3
    assert store.sent == [["r0"]] and group.batches == 0


async def test_appends_made_while_one_is_in_flight_go_as_one_batch() -> None:
    f = await first_in_flight(4)
    store, tokens, group, first = f.store, f.tokens, f.group, f.first
    rest = [asyncio.create_task(group.append(op(f"r{i}", tokens[f"r{i}"]))) for i in (1, 2, 3)]
    await until(lambda: len(group._queue) == 3, "the others queued")
    f.release()
    assert await first == 2
    assert await asyncio.gather(*rest) == [2, 2, 2]
    assert store.sent == [["r0"], ["r1", "r2", "r3"]] and group.batches == 1
    for i in range(4):
        snap = await store.read(f"r{i}")
        assert snap is not None and snap.log == [b"0", b"x"]


async def test_a_fenced_append_in_a_batch_fails_only_its_own_caller() -> None:
    f = await first_in_flight(4)
    store, tokens, group, first = f.store, f.tokens, f.group, f.first
    good = asyncio.create_task(group.append(op("r1", tokens["r1"])))
    stale = asyncio.create_task(group.append(op("r2", tokens["r2"] + 1)))
    also = asyncio.create_task(group.append(op("r3", tokens["r3"])))
    await until(lambda: len(group._queue) == 3, "the batch queued")
    f.release()
    await first
    assert await good == 2 and await also == 2
    with pytest.raises(LeaseLost):
        await stale
    snap = await store.read("r2")
    assert snap is not None and snap.log == [b"0"]


async def test_a_failed_batch_is_retried_one_append_at_a_time() -> None:
    f = await first_in_flight(3, BackendError("one bad row broke the transaction"))
    store, tokens, group, first = f.store, f.tokens, f.group, f.first
    good = asyncio.create_task(group.append(op("r1", tokens["r1"])))
    stale = asyncio.create_task(group.append(op("r2", tokens["r2"] + 1)))
    await until(lambda: len(group._queue) == 2, "the batch queued")
    f.release()
    await first
    assert await good == 2
    with pytest.raises(LeaseLost):
        await stale
    assert store.sent == [["r0"], ["r1", "r2"], ["r1"], ["r2"]]


async def test_a_store_that_is_down_fails_every_append_of_the_batch_at_once() -> None:
    f = await first_in_flight(3, BackendUnavailable("the store is unreachable"))
    store, tokens, group, first = f.store, f.tokens, f.group, f.first
    batch = [asyncio.create_task(group.append(op(f"r{i}", tokens[f"r{i}"]))) for i in (1, 2)]
    await until(lambda: len(group._queue) == 2, "the batch queued")
    f.release()
    await first
    for t in batch:
        with pytest.raises(BackendUnavailable):
            await t
    assert store.sent == [["r0"], ["r1", "r2"]]  # no one-by-one retries against a dead store


async def test_an_append_whose_caller_gave_up_before_it_was_sent_is_never_sent() -> None:
    f = await first_in_flight(3)
    store, tokens, group, first = f.store, f.tokens, f.group, f.first
    dropped = asyncio.create_task(group.append(op("r1", tokens["r1"])))
    kept = asyncio.create_task(group.append(op("r2", tokens["r2"])))
    await until(lambda: len(group._queue) == 2, "both queued")
    dropped.cancel()
    await asyncio.gather(dropped, return_exceptions=True)
    f.release()
    await first
    assert await kept == 2
    assert store.sent == [["r0"], ["r2"]]
    snap = await store.read("r1")
    assert snap is not None and snap.log == [b"0"]


async def test_an_end_in_a_batch_releases_its_run() -> None:
    f = await first_in_flight(2)
    store, tokens, group, first = f.store, f.tokens, f.group, f.first
    done = RunUpdate(status=RunStatus.COMPLETED, result=1, ended_at=T0)
    end = Append(run_id="r1", token=tokens["r1"], expected_len=1, records=[b"e"], update=done,
                 now=T0)  # fmt: skip
    ending = asyncio.create_task(group.append(end))
    f.release()
    await first
    assert await ending == 2
    run = await store.get_run("r1")
    assert run is not None and run.lease_owner is None and run.result == 1
