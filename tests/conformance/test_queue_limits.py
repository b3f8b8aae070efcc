"""Queue limits at claim time (DESIGN section 9). Every backend runs this file unchanged.

A claim obeys :class:`QueueLimits` atomically with itself: concurrency slots
are live leases per concurrency key, a rate counts first claims in a sliding
window, priority orders the candidates. Held-back runs are skipped, never a
barrier for the candidates behind them.
"""

from __future__ import annotations

import asyncio
import uuid

from substantial import RunStatus
from substantial.backends import Backend, Claim, Claims, NewRun, QueueLimits, RunUpdate

T0 = 1_700_000_000.0
WF = ("wf",)
LEASE = 10.0


def new_run(
    run_id: str | None = None,
    *,
    due: float = T0,
    queue: str = "q",
    key: str | None = None,
    priority: int = 0,
    created: float = T0,
) -> NewRun:
    return NewRun(
        run_id=run_id or uuid.uuid4().hex,
        workflow="wf",
        queue=queue,
        first_record=b'{"k":"start"}',
        created_at=created,
        due_at=due,
        priority=priority,
        concurrency_key=key,
    )


async def claim(
    b: Backend,
    limits: QueueLimits | None,
    *,
    limit: int = 100,
    now: float = T0,
    owner: str = "w1",
    queue: str = "q",
) -> list[Claim]:
    return await b.claim_due(
        queue=queue,
        workflows=WF,
        limit=limit,
        owner=owner,
        lease_seconds=LEASE,
        now=now,
        limits=limits,
    )


def ids(claims: list[Claim]) -> list[str]:
    return [c.run_id for c in claims]


async def test_a_run_keeps_its_priority_and_concurrency_key(backend: Backend) -> None:
    await backend.create_run(new_run("r1", key="acme", priority=7))
    await backend.create_run(new_run("r2"))
    r1, r2 = await backend.get_run("r1"), await backend.get_run("r2")
    assert r1 is not None and (r1.priority, r1.concurrency_key) == (7, "acme")
    assert r2 is not None and (r2.priority, r2.concurrency_key) == (0, None)


async def test_priority_orders_candidates_lowest_number_first(backend: Backend) -> None:
    for i, prio in enumerate([5, 1, 3, 1]):
        await backend.create_run(new_run(f"p{i}", priority=prio, created=T0 + i))
    got = await claim(backend, QueueLimits(priority=True), limit=4)
    assert ids(got) == ["p1", "p3", "p2", "p0"]


async def test_without_priority_the_queue_keeps_due_order(backend: Backend) -> None:
    await backend.create_run(new_run("late", due=T0 + 1, priority=0))
    await backend.create_run(new_run("early", due=T0, priority=9))
    got = await claim(backend, QueueLimits(), limit=2, now=T0 + 1)
    assert ids(got) == ["early", "late"]


async def test_priority_does_not_take_runs_that_are_not_due(backend: Backend) -> None:
    await backend.create_run(new_run("urgent-later", due=T0 + 60, priority=0))
    await backend.create_run(new_run("routine-now", priority=9))
    got = await claim(backend, QueueLimits(priority=True), limit=2)
    assert ids(got) == ["routine-now"]


async def test_concurrency_caps_live_leases_of_the_queue(backend: Backend) -> None:
    for i in range(5):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(concurrency=2)
    first = await claim(backend, limits)
    assert ids(first) == ["r0", "r1"]
    assert await claim(backend, limits, owner="w2") == []  # another worker is held too


async def test_a_released_slot_can_be_claimed_again(backend: Backend) -> None:
    for i in range(3):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(concurrency=2)
    held = await claim(backend, limits)
    assert await backend.release(
        held[0].run_id, token=held[0].token, due_at=None, status=RunStatus.SUSPENDED, now=T0 + 1
    )
    assert ids(await claim(backend, limits, now=T0 + 1)) == ["r2"]


async def test_a_finished_run_frees_its_slot(backend: Backend) -> None:
    for i in range(2):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(concurrency=1)
    (held,) = await claim(backend, limits)
    assert held.run_id == "r0"
    await backend.append(
        "r0",
        token=held.token,
        expected_len=1,
        records=[b'{"k":"end"}'],
        update=RunUpdate(status=RunStatus.COMPLETED, result=1, ended_at=T0 + 1),
        now=T0 + 1,
    )
    assert ids(await claim(backend, limits, now=T0 + 1)) == ["r1"]


async def test_an_expired_lease_gives_its_slot_back(backend: Backend) -> None:
    """A dead worker's slots come back when its leases expire."""
    for i in range(2):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(concurrency=1)
    assert ids(await claim(backend, limits, owner="dead")) == ["r0"]
    assert await claim(backend, limits, owner="w2", now=T0 + LEASE - 1) == []
    # once expired, the orphan itself is first in line again, and holds the one slot
    assert ids(await claim(backend, limits, owner="w2", now=T0 + LEASE)) == ["r0"]
    assert await claim(backend, limits, owner="w3", now=T0 + LEASE) == []


async def test_a_renewed_lease_keeps_its_slot(backend: Backend) -> None:
    for i in range(2):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(concurrency=1)
    (held,) = await claim(backend, limits)
    assert await backend.renew({held.run_id: held.token}, lease_seconds=LEASE, now=T0 + 8)
    assert await claim(backend, limits, owner="w2", now=T0 + LEASE + 1) == []


async def test_concurrency_counts_per_key_and_skips_full_keys(backend: Backend) -> None:
    keys = ["a", "a", "b", None, "b", None, "c"]
    for i, key in enumerate(keys):
        await backend.create_run(new_run(f"r{i}", key=key, created=T0 + i))
    limits = QueueLimits(concurrency=1)
    got = await claim(backend, limits)
    # one per key, the unkeyed runs a group of their own; full keys do not block the rest
    assert ids(got) == ["r0", "r2", "r3", "r6"]
    assert await claim(backend, limits, owner="w2") == []


async def test_the_slots_of_another_queue_do_not_count(backend: Backend) -> None:
    await backend.create_run(new_run("other", queue="elsewhere"))
    await backend.create_run(new_run("mine"))
    assert ids(await claim(backend, QueueLimits(concurrency=1), queue="elsewhere")) == ["other"]
    assert ids(await claim(backend, QueueLimits(concurrency=1))) == ["mine"]


async def test_racing_claimers_never_exceed_the_concurrency(backend: Backend) -> None:
    for i in range(12):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(concurrency=3)
    results = await asyncio.gather(
        *(claim(backend, limits, limit=2, owner=f"w{i}") for i in range(8))
    )
    taken = [c.run_id for got in results for c in got]
    assert len(taken) == 3 and len(set(taken)) == 3


async def test_rate_limits_first_claims_in_a_sliding_window(backend: Backend) -> None:
    for i in range(5):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(rate=3, period=5.0)
    got = await claim(backend, limits)
    assert ids(got) == ["r0", "r1", "r2"]
    assert await claim(backend, limits, now=T0 + 4.5) == []
    # the window holds starts with now - period < started_at <= now
    assert ids(await claim(backend, limits, now=T0 + 5)) == ["r3", "r4"]


async def test_a_rate_held_claim_says_when_the_window_frees(backend: Backend) -> None:
    for i in range(3):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(rate=1, period=2.0)
    first = await claim(backend, limits)
    assert ids(first) == ["r0"]
    assert isinstance(first, Claims) and first.held_until == T0 + 2.0
    held = await claim(backend, limits, now=T0 + 1)
    assert held == [] and isinstance(held, Claims) and held.held_until == T0 + 2.0
    assert ids(await claim(backend, limits, now=T0 + 2)) == ["r1"]


async def test_rate_does_not_hold_back_a_run_that_started_before(backend: Backend) -> None:
    await backend.create_run(new_run("resumer", created=T0))
    await backend.create_run(new_run("newcomer", created=T0 + 1))
    limits = QueueLimits(rate=1, period=60.0)
    (c,) = await claim(backend, limits)
    assert c.run_id == "resumer"
    assert await backend.release(
        "resumer", token=c.token, due_at=T0 + 1, status=RunStatus.SUSPENDED, now=T0
    )
    # the window is full, yet the suspended run resumes; the newcomer waits
    assert ids(await claim(backend, limits, now=T0 + 1)) == ["resumer"]


async def test_racing_claimers_never_exceed_the_rate(backend: Backend) -> None:
    for i in range(12):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(rate=4, period=60.0)
    results = await asyncio.gather(
        *(claim(backend, limits, limit=3, owner=f"w{i}") for i in range(8))
    )
    taken = [c.run_id for got in results for c in got]
    assert len(taken) == 4 and len(set(taken)) == 4


async def test_concurrency_and_rate_together(backend: Backend) -> None:
    for i in range(6):
        await backend.create_run(new_run(f"r{i}", created=T0 + i))
    limits = QueueLimits(concurrency=2, rate=3, period=60.0)
    got = await claim(backend, limits)
    assert ids(got) == ["r0", "r1"]
    for c in got:
        await backend.release(
            c.run_id, token=c.token, due_at=None, status=RunStatus.SUSPENDED, now=T0
        )
    # two slots free again, but only one start left in the window
    assert ids(await claim(backend, limits, now=T0 + 1)) == ["r2"]


async def test_no_limits_claims_as_before(backend: Backend) -> None:
    for i in range(3):
        await backend.create_run(new_run(f"r{i}", created=T0 + i, priority=3 - i))
    got = await claim(backend, None, limit=3)
    assert ids(got) == ["r0", "r1", "r2"]
