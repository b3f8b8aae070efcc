"""``start(..., delay=)``: a run no worker claims before its delay is over (PENDING
meanwhile), on every store; on the virtual clock the delay passes at once."""

from __future__ import annotations

from datetime import timedelta

import pytest

from substantial import ClientError, Context, RunStatus, workflow
from substantial.backends import Backend
from substantial.testing import TestEnvironment


@workflow()
async def stamp(c: Context) -> str:
    return (await c.now()).isoformat()


async def test_a_delayed_run_starts_after_its_delay(backend: Backend) -> None:
    async with TestEnvironment(stamp, backend=backend) as env:
        t0 = env.now()
        later = await env.conductor.start(stamp, delay=timedelta(hours=6))
        now = await env.conductor.start(stamp)
        assert await now.result(timeout=30) == t0.isoformat()  # time stood still
        await env.run_until_idle()
        assert await later.status() == RunStatus.PENDING  # not claimed: not yet due
        await env.advance(timedelta(hours=5))
        assert await later.status() == RunStatus.PENDING
        assert await later.result(timeout=30) == (t0 + timedelta(hours=6)).isoformat()


async def test_a_negative_delay_is_refused() -> None:
    async with TestEnvironment(stamp) as env:
        with pytest.raises(ClientError, match="zero or more"):
            await env.conductor.start(stamp, delay=-1)
