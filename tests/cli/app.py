"""Workflows served by ``substantial worker tests.cli.app:conductor`` in the CLI tests.

``conductor`` uses the store of ``SUBSTANTIAL_BACKEND`` (or ``--backend`` when the
command line gives one); ``tests.cli.app`` as a bare module serves every workflow
below on the ``--backend`` store.
"""

from __future__ import annotations

from typing import Any

from substantial import Conductor, Context, Retry, workflow


@workflow()
async def double(c: Context, n: int = 1) -> int:
    c.log.info("doubling", n=n)
    value: int = await c.save(lambda: n * 2)
    c.log.info("doubled", value=value)
    return value


@workflow()
async def boom(c: Context, message: str = "boom") -> None:
    def fail() -> None:
        raise ValueError(message)

    await c.save(fail, retry=Retry(max_attempts=1))


@workflow()
async def approval(c: Context) -> Any:
    c.log.info("waiting for approval")
    decision = await c.receive("decision")
    c.log.info("decided", decision=decision)
    return {"decision": decision}


conductor = Conductor()
conductor.register(double, boom, approval)
