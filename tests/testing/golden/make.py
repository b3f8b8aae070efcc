"""Write the golden histories of the examples: ``python -m tests.testing.golden.make``.

Each is a run of an example's workflow, made under a TestEnvironment and exported
as ``substantial export`` would. tests/testing/test_replay.py replays them against
the examples' code as it is now: a change to an example that would strand runs in
flight fails there. Regenerate only on purpose (a change meant to be incompatible).
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from pathlib import Path

from substantial.testing import TestEnvironment

from . import HERE, example

quickstart = example("quickstart")
readme_ws = example("readme_ws")


async def readme(out: Path) -> None:
    """The README's workflow: ended, and one waiting for its event."""
    random.seed(0)  # roulette: the seeded first shot passes
    async with TestEnvironment(readme_ws.example) as env:
        done = await env.conductor.start(readme_ws.example, run_id="readme-ended")
        await done.send("by", 2)
        await done.send("cancel")
        assert await done.result(timeout=10) == 100
        waiting = await env.conductor.start(readme_ws.example, run_id="readme-waiting")
        await env.advance(10)
        assert str(await waiting.status()) == "SUSPENDED"
        for run_id in ("readme-ended", "readme-waiting"):
            (out / f"{run_id}.json").write_bytes((await env.conductor.export([run_id])).dumps())


async def order(out: Path) -> None:
    """The quickstart's order (its effects go to a scratch directory)."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            async with TestEnvironment(quickstart.order) as env:
                h = await env.conductor.start(quickstart.order, {"item": "book"}, run_id="order")
                assert await h.result(timeout=10) == "book: 6 steps"
                (out / "quickstart-order.json").write_bytes(
                    (await env.conductor.export(["order"])).dumps()
                )
        finally:
            os.chdir(cwd)


async def main() -> None:
    await readme(HERE)
    await order(HERE)


if __name__ == "__main__":
    asyncio.run(main())
