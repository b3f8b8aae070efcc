"""The public API keeps types: mypy checks these ``assert_type`` lines (tests/ is
type-checked), and running them checks the values."""

from __future__ import annotations

from typing import Any, assert_type

from substantial import Conductor, Context, RunHandle, workflow
from substantial.backends.memory import MemoryBackend

from .engine.helpers import worker


@workflow()
async def total(c: Context, items: int = 2) -> int:
    return items * 10


async def test_a_handle_is_typed_by_the_workflow_it_started() -> None:
    c = Conductor(MemoryBackend())
    c.register(total)
    async with worker(c):
        h = await c.start(total, {"items": 3})
        assert_type(h, RunHandle[int])
        value = await h.result(timeout=10)
        assert_type(value, int)
        assert value == 30
        by_name = await c.start("total")
        assert_type(by_name, RunHandle[Any])
        assert await by_name.result(timeout=10) == 20
    await c.close()
