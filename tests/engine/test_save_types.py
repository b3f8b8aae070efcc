"""``save`` is typed: the value has the type of ``f``'s result, or of ``type=``.

The checks are for mypy (``assert_type`` does nothing at run time); the test
also runs the workflow, so what the annotations promise is what it gets.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import assert_type

from substantial import Conductor, Context, workflow

from .helpers import worker


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def fetch() -> list[int]:
    return [1, 2]


@workflow()
async def typed_saves(c: Context) -> list[object]:
    n = await c.save(lambda: 3)
    assert_type(n, int)
    xs = await c.save(fetch)
    assert_type(xs, list[int])
    p = await c.save(lambda: Point(1, 2), type=Point)
    assert_type(p, Point)
    when = await c.save(lambda: datetime(2030, 1, 2, tzinfo=UTC), type=datetime)
    assert_type(when, datetime)
    assert isinstance(p, Point) and isinstance(when, datetime)
    return [n, xs, p.x, when.year]


async def test_save_returns_the_declared_types(conductor: Conductor) -> None:
    conductor.register(typed_saves)
    async with worker(conductor, hot_wait=0):
        h = await conductor.start(typed_saves)
        assert await h.result(timeout=10) == [3, [1, 2], 1, 2030]
