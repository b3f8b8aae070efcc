"""A worker process for the crash and load tests.

    python -m tests.integration.worker_proc URL EFFECTS_FILE
        [--lease S] [--concurrency N] [--hot-wait S] [--ticker CATCHUP] [--queue Q]...

(run from the repository root so ``tests`` is importable). It registers the
test workflows below and serves them until killed, printing ``ready`` on
stdout once the store is open.

Every step's side effect is one line appended to EFFECTS_FILE::

    run_id step pid time

written with a single ``os.write`` on an ``O_APPEND`` descriptor, so lines of
concurrent processes never interleave and the file order is the order in which
the effects happened. ``time`` (epoch seconds) lets tests measure how quickly
an orphaned run resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import time
from datetime import timedelta

from substantial import Conductor, Context, Workflow, workflow

EFFECTS_FILE: str | None = None


def effect(run_id: str, step: int) -> int:
    """The non-idempotent side effect of one step: one atomic line in EFFECTS_FILE."""
    path = EFFECTS_FILE or os.environ["SUBSTANTIAL_TEST_EFFECTS"]
    line = f"{run_id} {step} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return step


@workflow()
async def steps(c: Context, n: int, sleep: float = 0.0, hold: float = 0.0) -> list[int]:
    """``n`` saved steps, each followed by a durable ``sleep``.

    ``hold`` keeps the worker inside the step's function for that long *after*
    the effect was recorded (so a test can freeze a worker mid-step).
    """
    run_id = c.run_id

    def step(i: int) -> int:
        value = effect(run_id, i)
        if hold:
            time.sleep(hold)
        return value

    done = []
    for i in range(n):
        done.append(await c.save(functools.partial(step, i)))
        if sleep:
            await c.sleep(sleep)
    return done


@workflow()
async def long_step(c: Context, seconds: float) -> str:
    """One step whose (blocking) function takes ``seconds``, then records its effect."""
    run_id = c.run_id

    def slow() -> int:
        time.sleep(seconds)
        return effect(run_id, 0)

    await c.save(slow)
    return "done"


@workflow()
async def compacting(c: Context, n: int, sleep: float = 0.0) -> int:
    """A loop carrying its state through keyed calls and compacting every round."""
    run_id = c.run_id

    def step(i: int) -> dict[str, int]:
        effect(run_id, i)
        return {"i": i + 1}

    state = await c.save(lambda: {"i": 0}, key="state")
    while state["i"] < n:
        state = await c.save(functools.partial(step, state["i"]), key="state")
        await c.compact()
        if sleep:
            await c.sleep(sleep, key="pause")
    return int(state["i"])


def next_month(st: dict[str, int]) -> dict[str, int]:
    return {"left": st["left"] - 1}


@workflow()
async def payroll(c: Context, months: int, pause: float = 0.03) -> dict[str, object]:
    """The payroll pattern: keyed state drives a compacted loop (one effect a
    round, numbered 0..months-1), then unkeyed calls: a receive, a log line and
    a last save (effect ``months``)."""
    run_id = c.run_id
    st = await c.save(lambda: {"left": months}, key="state")
    while st["left"] > 0:
        await c.save(functools.partial(effect, run_id, months - st["left"]), key="payment")
        await c.sleep(pause, key="pause")
        st = await c.save(functools.partial(next_month, st), key="state")
        await c.compact()
    got = await c.receive("go")
    c.log.info("paid", months=months)
    final = await c.save(functools.partial(effect, run_id, months))
    return {"got": got, "final": final}


@workflow()
async def critical(c: Context, hold: float) -> str:
    """One step: an effect as it enters (step 0) and one as it leaves (step 1),
    ``hold`` seconds later, so a test can count the runs inside it at once."""
    run_id = c.run_id

    def inside() -> int:
        effect(run_id, 0)
        time.sleep(hold)
        return effect(run_id, 1)

    await c.save(inside)
    return "done"


WORKFLOWS = (steps, long_step, compacting, payroll, critical)


def declare_queues(conductor: Conductor) -> None:
    """The limited queues of the flow-control tests (the test's client declares
    the same, as an application's workers and clients import one module)."""
    conductor.queue("narrow", concurrency=5)
    conductor.queue("paced", rate=(20, timedelta(seconds=1)))
    conductor.queue("keyed", concurrency=1)
    conductor.queue("ranked", priority=True)


async def tick(c: Context) -> str:
    """The scheduled workflow of ``--ticker``: one effect per tick's run."""
    run_id = c.run_id
    await c.save(functools.partial(effect, run_id, 0))
    return run_id


def ticker(catchup: float) -> Workflow[str]:
    """``ticker``: every second, overlapping runs allowed, ``catchup`` seconds back."""
    return workflow(name="ticker", every=1, overlap="allow", catchup=catchup)(tick)


async def serve(args: argparse.Namespace) -> None:
    async with Conductor(args.url) as conductor:
        conductor.register(*WORKFLOWS)
        declare_queues(conductor)
        if args.ticker is not None:
            conductor.register(ticker(args.ticker))
        task = conductor.run(
            queues=args.queue or ["default"],
            lease=args.lease,
            concurrency=args.concurrency,
            hot_wait=args.hot_wait,
        )
        print("ready", flush=True)
        await task


def main(argv: list[str] | None = None) -> None:
    global EFFECTS_FILE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("effects_file")
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hot-wait", type=float, default=5.0)
    parser.add_argument("--ticker", type=float, default=None, metavar="CATCHUP")
    parser.add_argument("--queue", action="append", default=[], help="serve this queue")
    args = parser.parse_args(argv)
    EFFECTS_FILE = os.path.abspath(args.effects_file)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s pid=%(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
