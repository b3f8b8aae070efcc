"""absurd's side of the peers bench (run with bench/peers/.venv, PyPI ``absurd-sdk``).

    bench/peers/.venv/bin/python bench/peers/peer_absurd.py local|remote|worker --dsn DSN

The schema is installed with absurd's own CLI, ``absurdctl init`` (PyPI
``absurdctl``, which bundles ``absurd.sql`` of its version and applies it with
``psql``), and the queue with ``absurdctl create-queue``, unless the database
has them already. The SDK's asynchronous client (``AsyncAbsurd``) spawns tasks
and awaits their results (it polls, from 50 ms doubling to 1 s); a worker is
``AsyncAbsurd.start_worker`` (claim polling every 0.25 s, the default) with the
concurrency of Substantial's default worker, 64 (absurd's default is 1). An
event name is global to a queue and its first emission wins, so ``wait_go``
waits for ``go:<task id>``. See common.py for the workloads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
import common
from absurd_sdk import AsyncAbsurd, AsyncTaskContext

QUEUE = "peers"
CONCURRENCY = 64


def register(app: AsyncAbsurd) -> None:
    """The four workflows as absurd tasks; params are ``{"args": [...]}``."""

    @app.register_task(name="peers.steps")
    async def steps(params: Any, ctx: AsyncTaskContext) -> int:
        (n,) = params["args"]
        for i in range(n):

            async def step(i: int = i) -> int:
                return i

            await ctx.step(f"s{i}", step)
        return int(n)

    @app.register_task(name="peers.wait_go")
    async def wait_go(params: Any, ctx: AsyncTaskContext) -> Any:
        return await ctx.await_event(f"go:{ctx.task_id}")

    @app.register_task(name="peers.paced")
    async def paced(params: Any, ctx: AsyncTaskContext) -> int:
        n, effects = params["args"]
        for i in range(1, n + 1):

            async def step(i: int = i) -> int:
                await asyncio.sleep(common.STEP_PAUSE)
                return common.effect(effects, i)

            await ctx.step(f"s{i}", step)
        return int(n)

    @app.register_task(name="peers.nap")
    async def nap(params: Any, ctx: AsyncTaskContext) -> None:
        (seconds,) = params["args"]
        await ctx.sleep_for("nap", seconds)


async def install_schema(dsn: str) -> None:
    """``absurdctl init`` and ``absurdctl create-queue`` where not done yet."""
    conn = await asyncpg.connect(dsn)
    try:
        has_schema = await conn.fetchval("SELECT to_regclass('absurd.queues')") is not None
        has_queue = has_schema and await conn.fetchval(
            "SELECT count(*) FROM absurd.queues WHERE queue_name = $1", QUEUE
        )
    finally:
        await conn.close()
    absurdctl = str(Path(sys.executable).parent / "absurdctl")
    steps = [] if has_schema else [["init"]]
    steps += [] if has_queue else [["create-queue", QUEUE]]
    for cmd in steps:
        proc = await asyncio.create_subprocess_exec(
            absurdctl, *cmd, "-d", dsn, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"absurdctl {' '.join(cmd)} failed: {out.decode().strip()}")


class AbsurdPeer(common.Peer):
    system = "absurd"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.client: AsyncAbsurd | None = None
        self.worker: AsyncAbsurd | None = None
        self.task: asyncio.Task[None] | None = None
        self.local = False
        self.pending: dict[str, asyncio.Future[Any]] = {}
        self.poller: asyncio.Task[None] | None = None

    def versions(self) -> dict[str, str]:
        return {p: version(p) for p in ("absurd-sdk", "absurdctl", "psycopg")}

    def settings(self) -> dict[str, Any]:
        return {"worker": f"AsyncAbsurd.start_worker(concurrency={CONCURRENCY}) "
                          "(poll_interval 0.25 s, the default)",
                "client": "AsyncAbsurd.spawn / await_task_result (polls 50 ms .. 1 s)",
                "lease_s": "claim_timeout 120 (default); W5: 5",
                "schema": "absurdctl init + create-queue (bundled absurd.sql)",
                "connections": "one per AsyncAbsurd instance (client, worker)"}  # fmt: skip

    async def open(self, *, local: bool) -> None:
        await install_schema(self.dsn)
        self.client = AsyncAbsurd(self.dsn, queue_name=QUEUE)
        # AsyncAbsurd connects on first use without a lock: calls made at once before
        # that each open a connection of their own (and keep only the last). One call
        # first, so that the concurrent starts of W1 and W7 share the one connection.
        await self.client.list_queues()
        self.local = local
        if local:
            self.poller = asyncio.create_task(self._poll_results())
            self.worker = AsyncAbsurd(self.dsn, queue_name=QUEUE)
            register(self.worker)
            self.task = asyncio.create_task(self.worker.start_worker(concurrency=CONCURRENCY))

    async def close(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            await asyncio.gather(self.poller, return_exceptions=True)
            self.poller = None
        if self.worker is not None and self.task is not None:
            self.worker.stop_worker()
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await self.worker.close()
            self.worker = self.task = None
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def start(self, workflow: str, *args: Any) -> str:
        assert self.client is not None
        spawned = await self.client.spawn(f"peers.{workflow}", {"args": list(args)}, queue=QUEUE)
        return str(spawned["task_id"])

    async def result(self, handle: str) -> Any:
        assert self.client is not None
        if self.local:
            self.pending[handle] = fut = asyncio.get_running_loop().create_future()
            return await fut
        snap = await self.client.await_task_result(handle)
        if snap.state != "completed":
            raise RuntimeError(f"task {handle} ended {snap.state}: {snap.failure}")
        return snap.result

    async def _poll_results(self) -> None:
        """In-process only: one reader for every awaited task, every 5 ms. absurd's
        ``await_task_result`` polls from 50 ms doubling to 1 s: in W1, W2 and W6 that
        would time its back-off, not the runs (W3 and W4 use it, as a client would)."""
        conn = await asyncpg.connect(self.dsn)
        query = (
            f"SELECT task_id::text, state, completed_payload FROM absurd.t_{QUEUE} "
            "WHERE task_id = ANY($1::uuid[]) AND state IN ('completed', 'failed', 'cancelled')"
        )
        try:
            while True:
                await asyncio.sleep(0.005)
                if not self.pending:
                    continue
                for task_id, state, payload in await conn.fetch(query, list(self.pending)):
                    fut = self.pending.pop(task_id)
                    if state == "completed":
                        fut.set_result(json.loads(payload))
                    else:
                        fut.set_exception(RuntimeError(f"task {task_id} ended {state}"))
        finally:
            await conn.close()

    async def send(self, handle: str, topic: str, value: Any) -> None:
        assert self.client is not None
        await self.client.emit_event(f"{topic}:{handle}", value)

    async def waiting(self, handle: str) -> bool:
        assert self.client is not None
        snap = await self.client.fetch_task_result(handle)
        return snap is not None and snap.state == "sleeping"

    def asleep_sql(self) -> str:
        return f"SELECT count(*) FROM absurd.t_{QUEUE} WHERE state = 'sleeping'"

    async def serve(self, lease: float | None, ready: Callable[[], None]) -> None:
        await install_schema(self.dsn)
        app = AsyncAbsurd(self.dsn, queue_name=QUEUE)
        register(app)
        claim = {} if lease is None else {"claim_timeout": max(1, round(lease))}
        task = asyncio.create_task(app.start_worker(concurrency=CONCURRENCY, **claim))
        ready()
        await task


if __name__ == "__main__":
    common.main(AbsurdPeer)
