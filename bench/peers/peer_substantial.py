"""Substantial's side of the peers bench (run with the project's own virtualenv).

    python bench/peers/peer_substantial.py local|remote|worker --dsn DSN --url STORE_URL

``--url`` is the store: ``postgresql://.../db?schema=...`` or ``redis://...?prefix=...``.
See common.py for the workloads.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from substantial import Conductor, Context, RunHandle, RunStatus, workflow


@workflow(name="peers.steps")
async def steps(c: Context, n: int) -> int:
    for i in range(n):

        async def step(i: int = i) -> int:
            return i

        await c.save(step)
    return n


@workflow(name="peers.wait_go")
async def wait_go(c: Context) -> Any:
    return await c.receive("go")


@workflow(name="peers.paced")
async def paced(c: Context, n: int, effects: str) -> int:
    for i in range(1, n + 1):

        async def step(i: int = i) -> int:
            await asyncio.sleep(common.STEP_PAUSE)
            return common.effect(effects, i)

        await c.save(step)
    return n


@workflow(name="peers.nap")
async def nap(c: Context, seconds: float) -> None:
    await c.sleep(seconds)


WORKFLOWS = {"steps": (steps, ("n",)), "wait_go": (wait_go, ()),
             "paced": (paced, ("n", "effects")), "nap": (nap, ("seconds",))}  # fmt: skip


def sqlite_raw_sampler(path: str, n: int) -> tuple[common.Sampler, Callable[[], Awaitable[None]]]:
    """W2's reference on SQLite, as bench/run.py: median ms of ``n`` BEGIN IMMEDIATE;
    INSERT; COMMIT in WAL mode with synchronous=NORMAL (the store's settings)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.executescript(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
        "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, data BLOB NOT NULL)"
    )

    def commits() -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (data) VALUES (?)", (common.PAYLOAD,))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    async def sample() -> float:
        return await asyncio.to_thread(commits)

    async def close() -> None:
        conn.close()

    return sample, close


class SubstantialPeer(common.Peer):
    system = "substantial"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.store = urlsplit(self.url).scheme.split("+")[0].replace("postgresql", "postgres")
        self.cond: Conductor | None = None
        self.task: asyncio.Task[None] | None = None

    def versions(self) -> dict[str, str]:
        return {"substantial": version("substantial")}

    def settings(self) -> dict[str, Any]:
        return {"worker": "Conductor.run() (in-process) or a subprocess doing the same",
                "concurrency": 64, "hot_wait_s": 5.0, "lease_s": "30 (default); W5: 5",
                "client": "Conductor(url).start / RunHandle.result (woken by hints)"}  # fmt: skip

    def _conductor(self) -> Conductor:
        cond = Conductor(self.url)
        cond.register(steps, wait_go, paced, nap)
        return cond

    async def open(self, *, local: bool) -> None:
        self.cond = self._conductor()
        await self.cond.__aenter__()
        if local:
            self.task = self.cond.run(handle_sigterm=False)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await self.task
            self.task = None
        if self.cond is not None:
            if hasattr(self.cond.backend, "drop_everything") and self.store == "redis":
                await self.cond.backend.drop_everything()  # our key prefix only
            await self.cond.close()
            self.cond = None

    async def start(self, workflow: str, *args: Any) -> RunHandle[Any]:
        assert self.cond is not None
        wf, names = WORKFLOWS[workflow]
        return await self.cond.start(wf, dict(zip(names, args, strict=True)))

    async def result(self, handle: RunHandle[Any]) -> Any:
        return await handle.result()

    async def send(self, handle: RunHandle[Any], topic: str, value: Any) -> None:
        await handle.send(topic, value)

    async def waiting(self, handle: RunHandle[Any]) -> bool:
        return await handle.status() == RunStatus.SUSPENDED

    async def raw_sampler(self, n: int) -> tuple[common.Sampler, Callable[[], Awaitable[None]]]:
        if self.store != "sqlite":
            return await super().raw_sampler(n)
        return sqlite_raw_sampler(str(Path(urlsplit(self.url).path).parent / "raw.db"), n)

    def asleep_sql(self) -> str:
        schema = parse_qs(urlsplit(self.url).query)["schema"][0]
        return (
            f'SELECT count(*) FROM "{schema}".runs '
            "WHERE status = 'SUSPENDED' AND lease_owner IS NULL"
        )

    async def serve(self, lease: float | None, ready: Callable[[], None]) -> None:
        async with self._conductor() as cond:
            task = cond.run(lease=lease)
            ready()
            await task


if __name__ == "__main__":
    common.main(SubstantialPeer)
