"""The Redis store: every protocol operation is one Lua script, hence atomic.

Keys (``P`` = the prefix; the braces are a hash tag, so all keys of a prefix share
one Cluster slot and a script may touch any of them)::

    {P}:run:<id>      hash    RunRecord fields (absent = None; floats as repr() text;
                              result as JSON; a flag is true when present) +
                              last_inbox_id, dkey (its due index), create_nonce,
                              op_nonce/op_result (retry de-duplication), counted
                              (the status it is counted under in {P}:counts);
                              priority, concurrency_key (absent = 0 / None), keyed,
                              st (the run keeps its published state: ``_redis_state``)
    {P}:state:<id>    hash    published key -> its latest value's JSON (``_redis_state``)
    {P}:log:<id>      list    log records (RPUSH, binary-safe; rewrite_log replaces it)
    {P}:inbox:<id>    list    inbox payloads; ids are dense, item N is at index N-1,
                              so the pending items are LRANGE inbox_pos -1
    {P}:due:<n>:<queue>:<workflow>   (n = byte length of queue: unambiguous name)
                      zset    due runs of one queue and workflow; score = due_at, or
                              the lease expiry when later (an expired lease makes the
                              run claimable again); no entry without due_at or when
                              terminal
    {P}:runs          zset    every run id by created_at (list_runs order; ties by id)
    {P}:wf:<workflow> zset    the same, per workflow
    {P}:counts        hash    "<status>:<workflow>" -> how many runs (count_runs)
    {P}:counted       string  set once every run older than the counters was counted
    {P}:nonce:<hex>   string  a delivery's inbox id, kept 5 minutes (retry de-dup)
    {P}:workers       hash    worker registry: worker id -> entry JSON
    {P}:workers:beat  hash    worker id -> last beat (epoch seconds, repr text)
    {P}:hints         channel run ids published on create, deliver, cancel, release, end
    {P}:lease:..., {P}:keyed:..., {P}:rated:..., {P}:starts:...
                              per queue: what a limited claim counts (``_redis_limits``)

One due index per (queue, workflow): ``claim_due`` reads only the workflows the
claimer serves (``limit`` entries of each, merged), so due runs of a workflow no
worker registers never starve claims and a claim's work is bounded by
``len(workflows) * limit``. Every script recomputes the run's index entry from
its hash (``reindex``), so the index cannot drift from the record. The plain claim
returns each claimed run as ``read`` would right after it (``Claim.snapshot``), and
a step's append (records alone) has a short script of its own: the two writes on
every run's path, each one round trip with as little to encode as it needs.

The counters follow the status in the script that changes it (``recount``, run by
every ``reindex``): a run whose ``counted`` differs from its ``status`` moves from
one counter to the other, so a crash never leaves a counter out of step with the
records (a script is atomic), and concurrent workers cannot double-count. Runs
written before the counters existed have no ``counted``; the first ``count_runs``
on such a store walks ``{P}:runs`` (ZSCAN, batches of one script call) to count
them, then sets ``{P}:counted``. Counting a run is idempotent, so the walk may race
with live writes and with another walk.

Times travel to Lua as ``repr`` strings and are stored as given: Lua compares them
with ``tonumber`` (exact) but never formats a float (``tostring`` keeps 14 digits).

Connection errors and timeouts are retried a few times, then raised as
:class:`BackendUnavailable`. A script whose reply was lost may have run, yet the
retry is safe: create_run, append, rewrite_log and release store a nonce with
their effect (a replay returns the first answer), deliver keeps its nonce in a key
for 5 minutes (no duplicate item), renew and request_cancel are idempotent. Only
``claim_due`` is not de-duplicated: runs of a claim whose reply was lost stay
leased until the lease expires, then are claimed again.

Scripts touch undeclared keys (the due index named in the hash; run, log, inbox and
state keys in claim_due, run and state keys in ``rows``; a queue's lease indexes), all under the
same hash tag: fine on Redis, and in the script's slot on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._supervision import reraise_if_cancelling
from .._types import RunStatus
from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    RunFinished,
    RunNotFound,
)
from . import _redis_limits as limiting
from . import _redis_lua as lua
from . import _redis_state as published
from . import _rules as rules
from ._protocol import (
    ALL_RUNS,
    Append,
    Claim,
    InboxItem,
    NewRun,
    QueueLimits,
    RunCounts,
    RunQuery,
    RunRecord,
    RunUpdate,
    Snapshot,
)
from ._redis_codec import fence_outcome, num, opt
from ._redis_hints import hint_stream
from ._registry import RedisRegistry

_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0)  # sleeps between attempts on connection errors
_LIST_BATCH = 200


redact = rules.redact  # kept importable from here: tests and callers use it


def _cmd(c: aioredis.Redis | aioredis.client.Pipeline, *args: Any) -> Awaitable[Any]:
    """One raw command (redis-py's typed wrappers return ``Awaitable | value`` unions)."""
    return c.execute_command(*args)


class RedisBackend(RedisRegistry):
    """Redis 6.2+ store. ``RedisBackend("redis://host:6379/0", prefix="myapp")``."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "substantial",
        poll_interval: float = 1.0,
        max_connections: int = 32,
    ) -> None:
        if not prefix:
            raise ConfigurationError("the redis key prefix must not be empty")
        self._url = url
        self._safe_url = rules.redact(url)
        self._secret_values = rules.secrets(url)
        self._prefix = prefix
        self._tag = "{" + prefix + "}"
        self._channel = f"{self._tag}:hints"
        self._poll_interval = poll_interval
        self._max_connections = max_connections
        self._client: aioredis.Redis | None = None
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._closed = False
        self.calls: dict[str, int] = {}  # operation -> count, for tests and curiosity

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def poll_interval(self) -> float | None:
        return self._poll_interval

    # -- keys ---------------------------------------------------------------

    def _key(self, kind: str, run_id: str) -> str:
        return f"{self._tag}:{kind}:{run_id}"

    def _due_key(self, queue: str, workflow: str) -> str:
        return f"{self._tag}:due:{len(queue.encode())}:{queue}:{workflow}"

    # -- connection ---------------------------------------------------------

    def _describe(self, what: str, exc: BaseException) -> str:
        text = rules.scrub(f"{type(exc).__name__}: {exc}", self._secret_values)
        return f"redis at {self._safe_url} {what} ({text})"

    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=self._max_connections,
                timeout=10,
                decode_responses=False,
                socket_connect_timeout=5,
                socket_timeout=30,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),  # we retry ourselves, see the module docstring
            )
        except ValueError as exc:
            raise ConfigurationError(f"bad redis URL {self._safe_url}: {exc}") from None
        client = aioredis.Redis(connection_pool=pool)
        try:
            await _cmd(client, "PING")
            for src in lua.SCRIPTS.values():
                await client.script_load(lua.PRELUDE + src)
        except (RedisError, OSError) as exc:
            await client.aclose()
            await pool.aclose()
            raise BackendUnavailable(self._describe("is unreachable", exc)) from exc
        self._scripts = {
            name: client.register_script(lua.PRELUDE + src) for name, src in lua.SCRIPTS.items()
        }
        self._pool, self._client, self._closed = pool, client, False

    async def close(self) -> None:
        client, pool = self._client, self._pool
        self._client, self._pool, self._closed = None, None, True
        if client is not None:
            await client.aclose()
        if pool is not None:
            await pool.aclose()

    def _require(self) -> aioredis.Redis:
        if self._client is None:
            raise BackendError("the redis backend is not open; call open() first")
        return self._client

    async def _exec(self, op: str, fn: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
        """Run ``fn`` on the client, retrying connection errors (safe: see the docstring)."""
        client = self._require()
        for attempt in range(len(_RETRY_DELAYS) + 1):
            try:
                return await fn(client)
            except AuthenticationError as exc:
                raise BackendUnavailable(self._describe("refused the credentials", exc)) from exc
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                reraise_if_cancelling()
                if attempt == len(_RETRY_DELAYS):
                    raise BackendUnavailable(self._describe(f"is unreachable ({op})", exc)) from exc
                await asyncio.sleep(_RETRY_DELAYS[attempt])
            except RedisError as exc:
                raise BackendError(self._describe(f"failed {op}", exc)) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _script(self, op: str, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self._count(op)
        self._require()
        script = self._scripts[name]
        return await self._exec(op, lambda c: script(keys=keys, args=args))

    # -- operations ---------------------------------------------------------

    async def create_run(self, new: NewRun) -> bool:
        rid = new.run_id
        keys = [
            self._key("run", rid),
            self._key("log", rid),
            f"{self._tag}:runs",
            self._key("wf", new.workflow),
            self._due_key(new.queue, new.workflow),
            self._key("state", rid),
        ]
        args = [
            rid,
            new.workflow,
            new.queue,
            num(new.created_at),
            opt(new.due_at),
            opt(new.parent_id),
            new.first_record,
            uuid.uuid4().hex,
            self._channel,
            str(new.priority),
            opt(new.concurrency_key),
            *published.state_args(new.state),
            *new.more_records,
        ]
        return bool(await self._script("create_run", "create", keys, args))

    async def claim_due(
        self,
        *,
        queue: str,
        workflows: Collection[str],
        limit: int,
        owner: str,
        lease_seconds: float,
        now: float,
        limits: QueueLimits | None = None,
    ) -> list[Claim]:
        if limit <= 0 or not workflows:
            self._count("claim_due")
            return []
        keys = [self._due_key(queue, wf) for wf in sorted(set(workflows))]
        if limits is not None and (limits.priority or rules.limited(limits)):
            keys[:0] = limiting.keys(self._tag, queue)
            args = limiting.claim_args(self._tag, queue, limits, now, owner, lease_seconds, limit)
            reply = await self._script("claim_due", "claim_limited", keys, args)
            return limiting.parse_claims(reply, limits)
        args = [num(now), owner, num(now + lease_seconds), limit, f"{self._tag}:run:"]
        args += [*limiting.keys(self._tag, queue)[:2], f"{self._tag}:"]
        claims = await self._script("claim_due", "claim", keys, args)
        return [
            Claim(run_id=rid.decode(), token=int(tok), snapshot=_snapshot(read))
            for rid, tok, *read in claims
        ]

    async def next_due(self, *, queue: str, workflows: Collection[str], now: float) -> float | None:
        """The lowest score of the workflows' due indexes (a score is the later of
        due time and lease expiry: see ``reindex``), one pipelined read."""
        self._count("next_due")
        keys = [self._due_key(queue, wf) for wf in sorted(set(workflows))]
        if not keys:
            return None

        async def heads(c: aioredis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for key in keys:
                pipe.zrange(key, 0, 0, withscores=True)
            return list(await pipe.execute())

        scores = [float(s) for reply in await self._exec("next_due", heads) for _, s in reply]
        return min(scores) if scores else None

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None:
        keys = [
            self._key("run", run_id),
            self._key("log", run_id),
            self._key("inbox", run_id),
            self._key("state", run_id),
        ]
        reply = await self._script("read", "read", keys, [log_from])
        return None if reply is None else _snapshot(reply)

    async def read_log_page(
        self, run_id: str, *, start: int, stop: int
    ) -> tuple[RunRecord, list[bytes]] | None:
        keys = [self._key("run", run_id), self._key("log", run_id), self._key("state", run_id)]
        reply = await self._script("read_log_page", "read_page", keys, [start, stop])
        rec = None if reply is None else published.record(reply[0], reply[2])
        return None if rec is None else (rec, list(reply[1]))

    async def append(
        self,
        run_id: str,
        *,
        token: int,
        expected_len: int,
        records: Sequence[bytes],
        update: RunUpdate | None = None,
        now: float,
    ) -> int:
        op = Append(
            run_id=run_id,
            token=token,
            expected_len=expected_len,
            records=records,
            update=update,
            now=now,
        )
        reply = await self._script("append", *self._append_call(op))
        return fence_outcome(run_id, expected_len, reply)

    async def append_batch(self, appends: Sequence[Append]) -> list[int | Exception]:
        """Group commit: the append scripts of every run in one pipeline (one round
        trip); each script is atomic and fenced on its own. A retry after a lost
        reply re-sends the pipeline with the same nonces, so no append lands twice."""
        self._count("append_batch")
        calls = [self._append_call(op) for op in appends]

        async def send(c: aioredis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for name, keys, args in calls:
                await self._scripts[name](keys=keys, args=args, client=pipe)
            return list(await pipe.execute(raise_on_error=False))

        replies = await self._exec("append_batch", send)
        out: list[int | Exception] = []
        for op, reply in zip(appends, replies, strict=True):
            if isinstance(reply, Exception):
                out.append(BackendError(self._describe("failed append", reply)))
                continue
            try:
                out.append(fence_outcome(op.run_id, op.expected_len, reply))
            except (BackendError, RunNotFound) as exc:
                out.append(exc)
        return out

    def _append_call(self, op: Append) -> tuple[str, list[str], list[Any]]:
        """The script, keys and arguments of ``op``. A step's append, records alone,
        has a short script of its own: a third of the arguments to encode and
        parse, on the path every step takes. With an update, the state hash is
        named even when nothing is published (a name costs no command; the script
        writes it only if asked)."""
        run, log = self._key("run", op.run_id), self._key("log", op.run_id)
        nonce = uuid.uuid4().hex
        if op.update is None:
            return "append_records", [run, log], [op.token, op.expected_len, nonce, *op.records]
        keys = [run, log, self._key("state", op.run_id)]
        u = op.update
        result = opt(json.dumps(u.result, separators=(",", ":"))) if u.has_result else ""
        return (
            "append",
            keys,
            [
                op.token,
                op.expected_len,
                nonce,
                num(op.now),
                self._channel,
                opt(u.status.value if u.status is not None else None),
                result,
                opt(u.error),
                opt(u.ended_at),
                opt(u.inbox_pos),
                "1" if u.release else "0",
                opt(u.due_at),
                opt(u.error_type),
                *published.state_args(u.state),
                *op.records,
            ],
        )

    async def rewrite_log(
        self,
        run_id: str,
        *,
        token: int,
        expected_len: int,
        records: Sequence[bytes],
        now: float,
    ) -> int:
        args = [token, expected_len, uuid.uuid4().hex, *records]
        keys = [self._key("run", run_id), self._key("log", run_id)]
        reply = await self._script("rewrite_log", "rewrite", keys, args)
        return fence_outcome(run_id, expected_len, reply)

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        if not leases:
            return set()
        ids = list(leases)
        keys = [self._key("run", rid) for rid in ids]
        args = [num(now + lease_seconds), *(leases[rid] for rid in ids)]
        held = await self._script("renew", "renew", keys, args)
        return {rid for rid, ok in zip(ids, held, strict=True) if ok}

    async def release(
        self, run_id: str, *, token: int, due_at: float | None, status: RunStatus, now: float
    ) -> bool:
        args = [token, opt(due_at), status.value, num(now), uuid.uuid4().hex, self._channel]
        return bool(await self._script("release", "release", [self._key("run", run_id)], args))

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        keys = [
            self._key("run", run_id),
            self._key("inbox", run_id),
            self._key("nonce", uuid.uuid4().hex),
        ]
        code, *rest = await self._script(
            "deliver", "deliver", keys, [data, num(now), self._channel]
        )
        if code == -1:
            raise RunNotFound(run_id)
        if code == -2:
            raise RunFinished(run_id, rest[0].decode())
        return int(rest[0])

    async def request_cancel(self, run_id: str, *, now: float, revert: bool = False) -> None:
        args = [num(now), self._channel, "1" if revert else ""]
        code = await self._script("request_cancel", "cancel", [self._key("run", run_id)], args)
        if code == -1:
            raise RunNotFound(run_id)

    async def reopen(
        self, run_id: str, *, status: RunStatus, expected_len: int, keep_len: int, now: float
    ) -> bool:
        keys = [self._key("run", run_id), self._key("log", run_id)]
        args = [status.value, expected_len, keep_len, num(now), self._channel]
        code = await self._script("reopen", "reopen", keys, args)
        if code == -1:
            raise RunNotFound(run_id)
        return bool(code)

    async def get_run(self, run_id: str) -> RunRecord | None:
        found = await self._rows("get_run", [run_id])
        return found[0] if found else None

    async def list_runs(self, query: RunQuery = ALL_RUNS) -> list[RunRecord]:
        """Newest first from the created_at index (``ZREVRANGEBYSCORE`` between the
        created bounds and the cursor), in pages; the other fields, ``state_equals``
        too (JSON equality needs the decoded values), are checked on each page's
        records, and pages are read until ``limit`` runs matched, so filtering here
        never makes a result short. Pages are not one snapshot: a run changing
        meanwhile is seen as it was when its page was read."""
        self._count("list_runs")
        if query.limit is not None and query.limit <= 0:
            return []
        if query.run_ids is not None:  # a handful of ids: read them, no index walk
            return rules.newest_first(await self._rows(None, sorted(query.run_ids)), query)
        index = f"{self._tag}:runs" if query.workflow is None else self._key("wf", query.workflow)
        high = query.created_before
        if query.before is not None:
            high = query.before[0] if high is None else min(high, query.before[0])
        hi = "+inf" if high is None else num(high)
        lo = "-inf" if query.created_after is None else num(query.created_after)
        batch = _LIST_BATCH if query.limit is None else min(max(query.limit, 10), _LIST_BATCH)
        out: list[RunRecord] = []
        skip = 0  # entries already read whose score is exactly ``hi`` (keyset paging)
        while query.limit is None or len(out) < query.limit:
            args = ("ZREVRANGEBYSCORE", index, hi, lo, "WITHSCORES", "LIMIT", skip, batch)
            flat = await self._exec("list_runs", lambda c: _cmd(c, *args))  # noqa: B023
            if not flat:
                break
            ids, scores = [rid.decode() for rid in flat[::2]], [float(x) for x in flat[1::2]]
            if scores[-1] == float(hi):
                skip += len(ids)
            else:
                hi, skip = num(scores[-1]), scores.count(scores[-1])
            out += rules.newest_first(await self._rows(None, ids), query)
            if len(ids) < batch:
                break
        return out if query.limit is None else out[: query.limit]

    async def count_runs(self) -> RunCounts:
        """The ``{P}:counts`` hash (one round trip), after the one-time walk that
        counts the runs older than it (see the module docstring)."""
        keys = [f"{self._tag}:counts", f"{self._tag}:counted"]
        flat = await self._script("count_runs", "counts", keys, [])
        if flat is None:
            await self._count_older_runs()
            await self._exec("count_runs", lambda c: _cmd(c, "SET", keys[1], "1"))
            flat = await self._script("count_runs", "counts", keys, [])
        out: RunCounts = {}
        for field, n in zip(flat[::2], flat[1::2], strict=True):
            status, _, workflow = field.decode().partition(":")
            if int(n) > 0:
                out[(workflow, RunStatus(status))] = int(n)
        return out

    async def _count_older_runs(self) -> None:
        """Count every run not yet counted: ZSCAN of ``{P}:runs`` (every run present
        throughout is seen at least once), each batch in one script call."""
        index, prefix, cursor = f"{self._tag}:runs", f"{self._tag}:run:", 0
        while True:
            args = ("ZSCAN", index, cursor, "COUNT", 1000)
            cursor_raw, flat = await self._exec("count_runs", lambda c: _cmd(c, *args))  # noqa: B023
            if flat:
                ids = [rid.decode() for rid, _score in flat]  # redis-py pairs them
                await self._script("count_runs", "recount", [f"{self._tag}:counts"], [prefix, *ids])
            cursor = int(cursor_raw)
            if cursor == 0:
                return

    async def _rows(self, op: str | None, run_ids: Sequence[str]) -> list[RunRecord]:
        """The records of ``run_ids`` that exist, with their published state: one
        script (``_redis_state.ROWS``), so one round trip and each run read with its
        state at one moment. ``op`` None: part of a ``list_runs`` (counted once)."""
        if not run_ids:
            return []
        keys = [f"{self._tag}:runs"]
        args = [f"{self._tag}:run:", f"{self._tag}:state:", *run_ids]
        if op is None:
            script = self._scripts["rows"]
            reply = await self._exec("list_runs", lambda c: script(keys=keys, args=args))
        else:
            reply = await self._script(op, "rows", keys, args)
        return published.records(reply)

    # -- hints ----------------------------------------------------------------

    def subscribe(self) -> AsyncIterator[str]:
        return hint_stream(lambda: self._client, lambda: self._closed, self._channel)

    # -- test helpers -----------------------------------------------------------

    async def drop_everything(self) -> None:
        """Delete every key of this prefix (tests' cleanup); works after close() too."""
        reopened = self._client is None
        if reopened:
            await self.open()
        client = self._require()
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in self._tag) + ":*"
        try:
            keys = [k async for k in client.scan_iter(match=pattern, count=500)]
            for i in range(0, len(keys), 500):
                await client.unlink(*keys[i : i + 500])
        finally:
            if reopened:
                await self.close()

    async def corrupt(self, run_id: str, position: int, data: bytes) -> None:
        """Overwrite one stored log record (to test how bad data is handled)."""
        await _cmd(self._require(), "LSET", self._key("log", run_id), position, data)


def _snapshot(reply: Sequence[Any]) -> Snapshot | None:
    """A read script's reply (run hash, log, pending inbox, state hash) as a snapshot;
    None for a run that is gone."""
    rec = published.record(reply[0], reply[3])
    if rec is None:
        return None
    inbox = [InboxItem(id=rec.inbox_pos + 1 + i, data=d) for i, d in enumerate(reply[2])]
    return Snapshot(run=rec, log=list(reply[1]), inbox=inbox)
