"""Conductor.counts(): runs per workflow and status, counted by the store (or, for a
store without the CountsRuns capability, in one pass over its pages)."""

from __future__ import annotations

from typing import Any

import pytest

from substantial import Conductor, Context, RunStatus, workflow
from substantial.backends import CountsRuns
from substantial.backends.memory import MemoryBackend
from substantial.errors import RunFailed

from .helpers import worker


@workflow()
async def square(c: Context, n: int) -> int:
    if n < 0:
        raise ValueError("negative")
    return n * n


@workflow()
async def idle(c: Context) -> None:
    return None


async def test_counts_every_workflow_by_status_zeros_included(conductor: Conductor) -> None:
    conductor.register(square, idle)
    for n in (1, 2, -1):
        await conductor.start(square, {"n": n}, run_id=f"s{n}")
    await conductor.start("nobody.serves", run_id="lost")  # never claimed: PENDING
    async with worker(conductor):
        assert await conductor.handle("s2").result(timeout=20) == 4
        assert await conductor.handle("s1").result(timeout=20) == 1
        with pytest.raises(RunFailed, match="negative"):
            await conductor.handle("s-1").result(timeout=20)
    found = await conductor.counts()
    assert set(found) == {"square", "idle", "nobody.serves"}
    assert all(set(by_status) == set(RunStatus) for by_status in found.values())
    assert found["square"][RunStatus.COMPLETED] == 2 and found["square"][RunStatus.FAILED] == 1
    assert sum(found["square"].values()) == 3  # each run once, in its final status
    assert sum(found["idle"].values()) == 0  # registered, no runs
    assert found["nobody.serves"][RunStatus.PENDING] == 1


class Uncounting:
    """A store without the CountsRuns capability (a third party's, say)."""

    def __init__(self) -> None:
        self._inner = MemoryBackend()

    def __getattr__(self, name: str) -> Any:
        if name == "count_runs":
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_a_store_that_cannot_count_is_counted_over_its_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from substantial import _journal

    monkeypatch.setattr(_journal, "COUNT_PAGE", 3)  # 10 runs: four pages
    store = Uncounting()
    assert not isinstance(store, CountsRuns)
    async with Conductor(store) as conductor:
        for i in range(10):
            await conductor.start("w.a" if i % 2 else "w.b", run_id=f"r{i}")
        found = await conductor.counts()
    assert found["w.a"][RunStatus.PENDING] == 5 and found["w.b"][RunStatus.PENDING] == 5
    assert store._inner.calls["list_runs"] == 4
