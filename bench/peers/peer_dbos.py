"""DBOS's side of the peers bench (run with bench/peers/.venv, PyPI ``dbos``).

    bench/peers/.venv/bin/python bench/peers/peer_dbos.py local|remote|worker --dsn DSN

DBOS keeps its system tables in the schema ``dbos`` of the database ``DSN``.
In-process (``local``): ``DBOS.start_workflow_async`` and the handle's
``get_result``. Across processes (``remote``), the documented way for a program
that is not the application: ``DBOSClient.enqueue_async`` on a queue the worker
registered, ``send_async``, and the client handle's ``get_result`` (which
polls). Library defaults throughout (queue polling 1 s, result polling 1 s).
See common.py for the workloads.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from dbos import DBOS, DBOSClient, EnqueueOptions

QUEUE = "peers"


@DBOS.step(name="peers.one")
async def one(i: int) -> int:
    return i


@DBOS.workflow(name="peers.steps")
async def steps(n: int) -> int:
    for i in range(n):
        await one(i)
    return n


@DBOS.workflow(name="peers.wait_go")
async def wait_go() -> Any:
    return await DBOS.recv_async("go", timeout_seconds=3600)


@DBOS.step(name="peers.paced_step")
async def paced_step(effects: str, i: int) -> int:
    await asyncio.sleep(common.STEP_PAUSE)
    return common.effect(effects, i)


@DBOS.workflow(name="peers.paced")
async def paced(n: int, effects: str) -> int:
    for i in range(1, n + 1):
        await paced_step(effects, i)
    return n


@DBOS.workflow(name="peers.nap")
async def nap(seconds: float) -> None:
    await DBOS.sleep_async(seconds)


WORKFLOWS: dict[str, Any] = {"steps": steps, "wait_go": wait_go, "paced": paced, "nap": nap}


class DBOSPeer(common.Peer):
    system = "dbos"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.client: DBOSClient | None = None
        self.launched = False

    def versions(self) -> dict[str, str]:
        return {p: version(p) for p in ("dbos", "sqlalchemy", "psycopg")}

    def settings(self) -> dict[str, Any]:
        return {"worker": "DBOS.launch() in one process (executor id 'local')",
                "local start": "DBOS.start_workflow_async + handle.get_result",
                "remote start": f"DBOSClient.enqueue_async on queue {QUEUE!r} (polled every "
                                "1 s, the default), client handle get_result (polls every 1 s, "
                                "the default)",
                "lease_s": "none: a dead executor's runs are recovered by the next process "
                           "launched with the same executor id",
                "log_level": "WARNING"}  # fmt: skip

    def _launch(self) -> None:
        DBOS(config={"name": "bench-peers", "system_database_url": self.dsn,
                     "log_level": "WARNING"})  # fmt: skip
        DBOS.launch()
        self.launched = True

    async def open(self, *, local: bool) -> None:
        if local:
            self._launch()
        else:
            DBOS.migrate(self.dsn)  # the client never migrates; a fresh database needs it
            self.client = DBOSClient(system_database_url=self.dsn)

    async def close(self) -> None:
        if self.client is not None:
            self.client.destroy()
            self.client = None
        if self.launched:
            DBOS.destroy()
            self.launched = False

    async def start(self, workflow: str, *args: Any) -> Any:
        if self.client is None:
            return await DBOS.start_workflow_async(WORKFLOWS[workflow], *args)
        options: EnqueueOptions = {"queue_name": QUEUE, "workflow_name": f"peers.{workflow}"}
        return await self.client.enqueue_async(options, *args)

    async def result(self, handle: Any) -> Any:
        return await handle.get_result()

    async def send(self, handle: Any, topic: str, value: Any) -> None:
        assert self.client is not None
        await self.client.send_async(handle.get_workflow_id(), value, topic)

    async def waiting(self, handle: Any) -> bool:
        # PENDING once dequeued; DBOS does not tell running from waiting in recv
        return bool((await handle.get_status()).status == "PENDING")

    def asleep_sql(self) -> str:
        return (
            "SELECT count(*) FROM dbos.operation_outputs o JOIN dbos.workflow_status s "
            "ON s.workflow_uuid = o.workflow_uuid "
            "WHERE o.function_name = 'DBOS.sleep' AND s.status = 'PENDING'"
        )

    async def serve(self, lease: float | None, ready: Callable[[], None]) -> None:
        self._launch()
        await DBOS.register_queue_async(QUEUE)
        ready()
        await asyncio.Event().wait()


if __name__ == "__main__":
    common.main(DBOSPeer)
