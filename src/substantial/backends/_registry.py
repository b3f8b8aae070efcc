"""The worker registry of each store: who serves what, and when each last beat.

Kept apart from the run operations (a registry entry never touches a run), one
mixin per store family, each written against the plumbing its store already has
(the SQLite thread and transactions, the PostgreSQL pool, the Redis client, the
file writer). The entry is tiny and written by its own worker only (register on
start, a beat each heartbeat, remove on a clean stop); anyone lists. Liveness is
the one shared rule: an entry is live while ``last_beat + lease_seconds > now``.
Entries that aged out are deleted lazily (on a register or a listing), so a
SIGKILLed worker leaves nothing behind for long; its beat, if it ever comes back,
finds no entry and the worker registers again.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ._fs_layout import file_name
from ._protocol import WorkerRecord

T = TypeVar("T")


def alive(w: WorkerRecord, now: float) -> bool:
    """The liveness rule: the last beat is younger than the worker's lease."""
    return w.last_beat + w.lease_seconds > now


def live(entries: Iterable[WorkerRecord], now: float) -> list[WorkerRecord]:
    """The live entries, by worker id (``list_workers``' order on every store)."""
    return sorted((w for w in entries if alive(w, now)), key=lambda w: w.worker_id)


def encode(w: WorkerRecord) -> bytes:
    """The entry as JSON (``last_beat`` included; stores that keep it apart ignore it)."""
    return orjson.dumps(
        {
            "worker_id": w.worker_id,
            "host": w.host,
            "pid": w.pid,
            "queues": list(w.queues),
            "workflows": list(w.workflows),
            "started_at": w.started_at,
            "lease_seconds": w.lease_seconds,
            "last_beat": w.last_beat,
        }
    )


def decode(raw: bytes | str, last_beat: float | None = None) -> WorkerRecord:
    d = orjson.loads(raw)
    return WorkerRecord(
        worker_id=d["worker_id"],
        host=d["host"],
        pid=int(d["pid"]),
        queues=tuple(d["queues"]),
        workflows=tuple(d["workflows"]),
        started_at=float(d["started_at"]),
        lease_seconds=float(d["lease_seconds"]),
        last_beat=float(d["last_beat"] if last_beat is None else last_beat),
    )


# -- SQLite: table ``workers`` (schema version 3) -------------------------------------

SQLITE_TABLE = (
    "CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, info TEXT NOT NULL, "
    "lease REAL NOT NULL, last_beat REAL NOT NULL)"
)


class SQLiteRegistry:
    """``workers(worker_id, info JSON, lease, last_beat)``; one transaction per op."""

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _run(self, fn: Callable[[sqlite3.Connection], T], begin: str | None) -> T:
        raise NotImplementedError

    async def register_worker(self, info: WorkerRecord, *, now: float) -> None:
        row = (info.worker_id, encode(info).decode(), info.lease_seconds, now)

        def tx(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM workers WHERE last_beat + lease <= ?", (now,))
            c.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)", row)

        await self._write(tx)

    async def beat_worker(self, worker_id: str, *, now: float) -> bool:
        stmt = "UPDATE workers SET last_beat = ? WHERE worker_id = ?"
        return await self._write(lambda c: c.execute(stmt, (now, worker_id)).rowcount == 1)

    async def remove_worker(self, worker_id: str) -> None:
        stmt = "DELETE FROM workers WHERE worker_id = ?"
        await self._write(lambda c: c.execute(stmt, (worker_id,)))

    async def list_workers(self, *, now: float) -> list[WorkerRecord]:
        stmt = "SELECT info, last_beat FROM workers WHERE last_beat + lease > ?"
        rows = await self._run(lambda c: c.execute(stmt, (now,)).fetchall(), None)
        return live((decode(info, beat) for info, beat in rows), now)


# -- PostgreSQL: table ``workers`` (migration 5) --------------------------------------

PG_MIGRATION = """
CREATE TABLE {s}.workers (
    worker_id text PRIMARY KEY, info text NOT NULL,
    lease double precision NOT NULL, last_beat double precision NOT NULL
);
"""
PG_REGISTER = """WITH pruned AS (
    DELETE FROM {s}.workers WHERE last_beat + lease <= $4::float8 AND worker_id <> $1
)
INSERT INTO {s}.workers (worker_id, info, lease, last_beat) VALUES ($1, $2, $3, $4)
ON CONFLICT (worker_id) DO UPDATE
   SET info = EXCLUDED.info, lease = EXCLUDED.lease, last_beat = EXCLUDED.last_beat"""
PG_BEAT = "UPDATE {s}.workers SET last_beat = $2 WHERE worker_id = $1 RETURNING worker_id"
PG_REMOVE = "DELETE FROM {s}.workers WHERE worker_id = $1"
PG_LIST = "SELECT info, last_beat FROM {s}.workers WHERE last_beat + lease > $1::float8"


class PostgresRegistry:
    """One statement per op."""

    async def _q(
        self, method: str, template: str, *args: Any, retry: bool = True, control: bool = False
    ) -> Any:
        raise NotImplementedError

    async def register_worker(self, info: WorkerRecord, *, now: float) -> None:
        args = (info.worker_id, encode(info).decode(), info.lease_seconds, now)
        await self._q("execute", PG_REGISTER, *args)

    async def beat_worker(self, worker_id: str, *, now: float) -> bool:
        # the pool, not the heartbeat's own connection: lease renewals never wait for it
        return await self._q("fetchval", PG_BEAT, worker_id, now) is not None

    async def remove_worker(self, worker_id: str) -> None:
        await self._q("execute", PG_REMOVE, worker_id)

    async def list_workers(self, *, now: float) -> list[WorkerRecord]:
        rows = await self._q("fetch", PG_LIST, now)
        return live((decode(r["info"], r["last_beat"]) for r in rows), now)


# -- Redis: hashes ``{P}:workers`` (id -> JSON) and ``{P}:workers:beat`` (id -> time) ----

# The beat writes only where an entry is: a removed worker must not reappear half.
REDIS_BEAT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


class RedisRegistry:
    """Two hashes under the prefix's hash tag; a beat is one small script."""

    _tag: str

    async def _exec(self, op: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        raise NotImplementedError

    def _registry_keys(self) -> tuple[str, str]:
        return f"{self._tag}:workers", f"{self._tag}:workers:beat"

    async def register_worker(self, info: WorkerRecord, *, now: float) -> None:
        infos, beats = self._registry_keys()

        async def go(c: Any) -> None:
            async with c.pipeline(transaction=True) as p:
                p.hset(infos, info.worker_id, encode(info))
                p.hset(beats, info.worker_id, repr(float(now)))
                await p.execute()

        await self._exec("register_worker", go)

    async def beat_worker(self, worker_id: str, *, now: float) -> bool:
        keys = self._registry_keys()
        args = (worker_id, repr(float(now)))
        return bool(await self._exec("beat_worker", lambda c: c.eval(REDIS_BEAT, 2, *keys, *args)))

    async def remove_worker(self, worker_id: str) -> None:
        infos, beats = self._registry_keys()

        async def go(c: Any) -> None:
            async with c.pipeline(transaction=True) as p:
                p.hdel(infos, worker_id)
                p.hdel(beats, worker_id)
                await p.execute()

        await self._exec("remove_worker", go)

    async def list_workers(self, *, now: float) -> list[WorkerRecord]:
        infos, beats = self._registry_keys()

        async def go(c: Any) -> list[Any]:
            async with c.pipeline(transaction=True) as p:
                p.hgetall(infos)
                p.hgetall(beats)
                out: list[Any] = await p.execute()
                return out

        raw_infos, raw_beats = await self._exec("list_workers", go)
        entries = [
            decode(raw, float(raw_beats[key])) for key, raw in raw_infos.items() if key in raw_beats
        ]
        dead = [w.worker_id for w in entries if not alive(w, now)]
        if dead:  # lazily: a dead worker's beat finds no entry and registers again

            async def prune(c: Any) -> None:
                async with c.pipeline(transaction=True) as p:
                    p.hdel(infos, *dead)
                    p.hdel(beats, *dead)
                    await p.execute()

            await self._exec("list_workers", prune)
        return live(entries, now)


# -- files: ``workers/<name>.json`` under the root ------------------------------------


class FsRegistry:
    """One JSON file per worker, replaced whole on each beat (write + rename).

    Only the worker itself writes its file (others only delete a dead one), so no
    lock: a beat racing the deletion of its aged-out entry may bring it back, and
    that worker is alive then anyway."""

    _root: Path

    def _workers_dir(self) -> Path:
        d = self._root / "workers"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _write_entry(self, w: WorkerRecord) -> None:
        path = self._workers_dir() / (file_name(w.worker_id) + ".json")
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(encode(w))
        os.replace(tmp, path)

    def _entry(self, path: Path) -> WorkerRecord | None:
        try:
            return decode(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError, KeyError):
            return None

    async def register_worker(self, info: WorkerRecord, *, now: float) -> None:
        await asyncio.to_thread(self._write_entry, replace(info, last_beat=now))

    async def beat_worker(self, worker_id: str, *, now: float) -> bool:
        def beat() -> bool:
            path = self._workers_dir() / (file_name(worker_id) + ".json")
            w = self._entry(path)
            if w is None:
                return False
            self._write_entry(replace(w, last_beat=now))
            return True

        return await asyncio.to_thread(beat)

    async def remove_worker(self, worker_id: str) -> None:
        path = self._workers_dir() / (file_name(worker_id) + ".json")
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def list_workers(self, *, now: float) -> list[WorkerRecord]:
        def scan() -> list[WorkerRecord]:
            entries = []
            for path in self._workers_dir().glob("*.json"):
                w = self._entry(path)
                if w is not None and alive(w, now):
                    entries.append(w)
                elif w is not None:
                    path.unlink(missing_ok=True)  # aged out
            return live(entries, now)

        return await asyncio.to_thread(scan)


# -- S3: one object per worker, ``workers/<id>`` ----------------------------------------


class S3Registry:
    """One object per worker, replaced whole on each beat. As with files, only the
    worker writes its own entry; a lister deletes the entries that aged out."""

    _bucket: Any  # _s3_client.Bucket
    _keys: Any  # _s3_layout.Keys

    async def register_worker(self, info: WorkerRecord, *, now: float) -> None:
        await self._bucket.put(
            self._keys.worker(info.worker_id), encode(replace(info, last_beat=now))
        )

    async def beat_worker(self, worker_id: str, *, now: float) -> bool:
        key = self._keys.worker(worker_id)
        got = await self._bucket.get(key)
        if got is None:
            return False
        w = decode(got[0])
        return (
            await self._bucket.put(key, encode(replace(w, last_beat=now)), if_match=got[1])
            is not None
        )

    async def remove_worker(self, worker_id: str) -> None:
        await self._bucket.delete(self._keys.worker(worker_id))

    async def list_workers(self, *, now: float) -> list[WorkerRecord]:
        listed = await self._bucket.list(self._keys.workers)
        got = await asyncio.gather(*(self._bucket.get(o.key) for o in listed))
        entries = []
        for o, found in zip(listed, got, strict=True):
            if found is None:
                continue
            w = decode(found[0])
            if alive(w, now):
                entries.append(w)
            else:
                await self._bucket.delete(o.key)  # aged out
        return live(entries, now)
