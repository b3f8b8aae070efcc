from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from substantial import Conductor


@asynccontextmanager
async def worker(c: Conductor, **options: Any) -> AsyncIterator[asyncio.Task[None]]:
    """Run a worker for the duration of the block; stop it cleanly afterwards."""
    options.setdefault("handle_sigterm", False)
    task = c.run(**options)
    try:
        yield task
    finally:
        task.cancel()
        await task


async def eventually(check: Any, timeout: float = 10.0, every: float = 0.02) -> None:
    """Wait until ``await check()`` (or ``check()``) is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)
