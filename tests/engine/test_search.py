"""search(): newest first, paged by an opaque cursor, filtered in the store where
it can be, with the filter grammar's meaning kept exactly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from substantial import Conductor, Context, RunStatus, workflow
from substantial.errors import ClientError

from .helpers import worker


@workflow()
async def square(c: Context, n: int) -> int:
    return n * n


async def started(conductor: Conductor, count: int) -> list[str]:
    ids = []
    for i in range(count):
        h = await conductor.start(square, {"n": i}, run_id=f"run-{i:02}")
        ids.append(h.run_id)
    return ids


async def test_pages_cover_every_match_once_newest_first(conductor: Conductor) -> None:
    conductor.register(square)
    ids = await started(conductor, 25)
    async with worker(conductor):
        for run_id in ids:
            await conductor.handle(run_id).result(timeout=20)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await conductor.search_page(square, {"gte": 16}, limit=7, cursor=cursor)
        pages += 1
        seen += [s.run_id for s in page.runs]
        assert len(page.runs) <= 7
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    expected = [f"run-{i:02}" for i in range(24, 3, -1)]  # n*n >= 16, newest first
    assert seen == expected
    assert pages == 3
    assert [s.run_id for s in await conductor.search(square, {"gte": 16})] == expected
    assert [s.run_id for s in await conductor.search(square, limit=2)] == ["run-24", "run-23"]


async def test_pushed_down_terms_keep_their_meaning(conductor: Conductor) -> None:
    conductor.register(square)
    ids = await started(conductor, 6)
    async with worker(conductor):
        for run_id in ids:
            await conductor.handle(run_id).result(timeout=20)
    one = (await conductor.search(square, {"run_id": {"eq": "run-03"}}))[0]
    assert one.result == 9
    by_ids = await conductor.search(square, {"run_id": {"in": ["run-01", "run-04", "nope"]}})
    assert [s.run_id for s in by_ids] == ["run-04", "run-01"]
    assert await conductor.search(square, {"run_id": {"in": "run-0"}}) == []  # substring of v
    assert started_at(one) is not None
    exact = await conductor.search(square, {"started_at": {"eq": started_at(one)}})
    assert "run-03" in [s.run_id for s in exact]  # a run's own start time finds it
    later = await conductor.search(
        square, {"and": [{"started_at": {"gt": started_at(one)}}, {"status": {"eq": "COMPLETED"}}]}
    )
    assert "run-03" not in [s.run_id for s in later]
    assert {s.run_id for s in later} <= {"run-04", "run-05"}
    unfinished = await conductor.search(square, {"ended_at": {"eq": None}})
    assert unfinished == []
    either = await conductor.search(
        square, {"or": [{"run_id": {"eq": "run-00"}}, {"status": {"eq": RunStatus.FAILED}}]}
    )
    assert [s.run_id for s in either] == ["run-00"]


def started_at(summary: object) -> datetime | None:
    value = getattr(summary, "started_at", None)
    assert value is None or value.tzinfo == UTC
    return value


async def test_a_bad_cursor_or_limit_is_a_clear_error(conductor: Conductor) -> None:
    with pytest.raises(ClientError, match="cursor"):
        await conductor.search(square, limit=5, cursor="not-a-cursor")
    with pytest.raises(ClientError, match="limit"):
        await conductor.search_page(square, limit=0)
