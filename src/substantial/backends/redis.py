"""The Redis store: every protocol operation is one Lua script, hence atomic.

Keys (``P`` = the prefix; the braces are a hash tag, so all keys of a prefix share
one Cluster slot and a script may touch any of them)::

    {P}:run:<id>      hash    RunRecord fields (absent = None; floats as repr() text;
                              result as JSON) + last_inbox_id, dkey (its due index),
                              create_nonce, op_nonce/op_result (retry de-duplication)
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
    {P}:nonce:<hex>   string  a delivery's inbox id, kept 5 minutes (retry de-dup)
    {P}:hints         channel run ids published on create, deliver, cancel, release, end

One due index per (queue, workflow): ``claim_due`` reads only the workflows the
claimer serves (``limit`` entries of each, merged), so due runs of a workflow no
worker registers never starve claims and a claim's work is bounded by
``len(workflows) * limit``. Every script recomputes the run's index entry from
its hash (``reindex``), so the index cannot drift from the record.

Times travel to Lua as ``repr`` strings and are stored as given: Lua compares them
with ``tonumber`` (exact) but never formats a float (``tostring`` keeps 14 digits).

Connection errors and timeouts are retried a few times, then raised as
:class:`BackendUnavailable`. A script whose reply was lost may have run, yet the
retry is safe: create_run, append, rewrite_log and release store a nonce with
their effect (a replay returns the first answer), deliver keeps its nonce in a key
for 5 minutes (no duplicate item), renew and request_cancel are idempotent. Only
``claim_due`` is not de-duplicated: runs of a claim whose reply was lost stay
leased until the lease expires, then are claimed again.

Scripts touch undeclared keys (the due index named in the hash; run keys in
claim_due), all under the same hash tag: fine on Redis, and in the script's slot
on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._types import RunStatus
from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    LeaseLost,
    RunFinished,
    RunNotFound,
)
from ._protocol import Claim, InboxItem, NewRun, RunRecord, RunUpdate, Snapshot

_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0)  # sleeps between attempts on connection errors
_NONCE_TTL = 300
_LIST_BATCH = 200

_PRELUDE = (
    "local TERM = {"
    + ", ".join(f"{s.value}=true" for s in RunStatus if s.is_terminal)
    + "}\n"
    + """
local function opt(a) if a == '' then return nil end return string.sub(a, 2) end
local function reindex(rk)
  local f = redis.call('HMGET', rk, 'run_id', 'dkey', 'status', 'due_at', 'lease_expires_at')
  if TERM[f[3]] or not f[4] then redis.call('ZREM', f[2], f[1]) return end
  local s = f[4]
  if f[5] and tonumber(f[5]) > tonumber(s) then s = f[5] end
  redis.call('ZADD', f[2], s, f[1])
end
local function release(rk, due, now)
  local f = redis.call('HMGET', rk, 'status', 'last_inbox_id', 'inbox_pos', 'cancel_requested')
  if TERM[f[1]] then due = nil
  elseif tonumber(f[2]) > tonumber(f[3]) or f[4] then
    if due == nil or tonumber(due) > tonumber(now) then due = now end
  end
  redis.call('HDEL', rk, 'lease_owner', 'lease_expires_at')
  if due then redis.call('HSET', rk, 'due_at', due) else redis.call('HDEL', rk, 'due_at') end
  reindex(rk)
end
"""
)

# KEYS run, log, runs, wf, due; ARGV id, workflow, queue, created, due?, parent?, first,
# nonce, channel
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'create_nonce') == ARGV[8] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'workflow', ARGV[2], 'queue', ARGV[3],
  'status', 'PENDING', 'created_at', ARGV[4], 'log_len', 1, 'inbox_pos', 0, 'lease_token', 0,
  'last_inbox_id', 0, 'dkey', KEYS[5], 'create_nonce', ARGV[8])
local due = opt(ARGV[5])
if due then redis.call('HSET', KEYS[1], 'due_at', due) end
local parent = opt(ARGV[6])
if parent then redis.call('HSET', KEYS[1], 'parent_id', parent) end
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[2], ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
reindex(KEYS[1])
redis.call('PUBLISH', ARGV[9], ARGV[1])
return 1
"""

# KEYS the due indexes of the claimer's workflows; ARGV now, owner, expiry, limit, run-key prefix
_CLAIM = """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[4])
local cands = {}
for i = 1, #KEYS do
  local r = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, limit)
  for j = 1, #r, 2 do
    local created = redis.call('HGET', ARGV[5] .. r[j], 'created_at')
    cands[#cands + 1] = {r[j], tonumber(r[j + 1]), tonumber(created) or 0, KEYS[i]}
  end
end
table.sort(cands, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  if a[3] ~= b[3] then return a[3] < b[3] end
  return a[1] < b[1]
end)
local out = {}
for _, c in ipairs(cands) do
  if #out >= 2 * limit then break end
  local rk = ARGV[5] .. c[1]
  local f = redis.call('HMGET', rk, 'status', 'due_at', 'lease_expires_at', 'lease_token',
    'started_at')
  if not f[1] then
    redis.call('ZREM', c[4], c[1])
  elseif not TERM[f[1]] and f[2] and tonumber(f[2]) <= now
      and (not f[3] or tonumber(f[3]) <= now) then
    local tok = tonumber(f[4]) + 1
    redis.call('HSET', rk, 'status', 'RUNNING', 'lease_token', tok, 'lease_owner', ARGV[2],
      'lease_expires_at', ARGV[3])
    if not f[5] then redis.call('HSET', rk, 'started_at', ARGV[1]) end
    reindex(rk)
    out[#out + 1] = c[1]
    out[#out + 1] = tok
  else
    reindex(rk)
  end
end
return out
"""

# KEYS run, log, inbox; ARGV log_from
_READ = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
local pos = redis.call('HGET', KEYS[1], 'inbox_pos')
return {h, redis.call('LRANGE', KEYS[2], ARGV[1], -1), redis.call('LRANGE', KEYS[3], pos, -1)}
"""

# KEYS run, log; ARGV token, expected_len, now, channel, nonce, status?, result?, error?,
# ended_at?, inbox_pos?, release, has_update, due?, records...
_APPEND = """
local rk = KEYS[1]
local f = redis.call('HMGET', rk, 'lease_token', 'log_len', 'op_nonce', 'op_result')
if not f[1] then return {-1} end
if tonumber(f[1]) ~= tonumber(ARGV[1]) then return {-2} end
if f[3] == ARGV[5] then return {1, tonumber(f[4])} end
if tonumber(f[2]) ~= tonumber(ARGV[2]) then return {-3, tonumber(f[2])} end
local n = tonumber(f[2])
for i = 14, #ARGV, 1000 do
  n = redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HSET', rk, 'log_len', n, 'op_nonce', ARGV[5], 'op_result', n)
if ARGV[12] == '1' then
  local names = {[6] = 'status', [7] = 'result', [8] = 'error', [9] = 'ended_at',
    [10] = 'inbox_pos'}
  for i = 6, 10 do
    local v = opt(ARGV[i])
    if v then redis.call('HSET', rk, names[i], v) end
  end
  if ARGV[11] == '1' or TERM[redis.call('HGET', rk, 'status')] then
    release(rk, opt(ARGV[13]), ARGV[3])
    redis.call('PUBLISH', ARGV[4], redis.call('HGET', rk, 'run_id'))
  end
end
return {1, n}
"""

# KEYS run, log; ARGV token, expected_len, nonce, records...
_REWRITE = """
local f = redis.call('HMGET', KEYS[1], 'lease_token', 'log_len', 'op_nonce', 'op_result')
if not f[1] then return {-1} end
if tonumber(f[1]) ~= tonumber(ARGV[1]) then return {-2} end
if f[3] == ARGV[3] then return {1, tonumber(f[4])} end
if tonumber(f[2]) ~= tonumber(ARGV[2]) then return {-3, tonumber(f[2])} end
redis.call('DEL', KEYS[2])
local n = 0
for i = 4, #ARGV, 1000 do
  n = redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HSET', KEYS[1], 'log_len', n, 'op_nonce', ARGV[3], 'op_result', n)
return {1, n}
"""

# KEYS run; ARGV token, expiry
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'lease_token', 'lease_owner')
  if not f[1] or tonumber(f[1]) ~= tonumber(ARGV[i + 1]) or not f[2] then
    out[i] = 0
  else
    redis.call('HSET', key, 'lease_expires_at', ARGV[1])
    reindex(key)
    out[i] = 1
  end
end
return out
"""

# KEYS run; ARGV token, due?, status, now, nonce, channel
_RELEASE = """
local f = redis.call('HMGET', KEYS[1], 'lease_token', 'lease_owner', 'status', 'op_nonce',
  'run_id')
if not f[1] or tonumber(f[1]) ~= tonumber(ARGV[1]) then return 0 end
if f[4] == ARGV[5] then return 1 end
if not f[2] then return 0 end
if not TERM[f[3]] then redis.call('HSET', KEYS[1], 'status', ARGV[3]) end
release(KEYS[1], opt(ARGV[2]), ARGV[4])
redis.call('HSET', KEYS[1], 'op_nonce', ARGV[5])
redis.call('PUBLISH', ARGV[6], f[5])
return 1
"""

# KEYS run, inbox, nonce; ARGV data, now, channel
_DELIVER = """
local prev = redis.call('GET', KEYS[3])
if prev then return {1, tonumber(prev)} end
local f = redis.call('HMGET', KEYS[1], 'status', 'run_id')
if not f[1] then return {-1} end
if TERM[f[1]] then return {-2, f[1]} end
local id = redis.call('HINCRBY', KEYS[1], 'last_inbox_id', 1)
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'due_at', ARGV[2])
reindex(KEYS[1])
redis.call('SET', KEYS[3], id, 'EX', @TTL@)
redis.call('PUBLISH', ARGV[3], f[2])
return {1, id}
""".replace("@TTL@", str(_NONCE_TTL))

# KEYS run; ARGV now, channel
_CANCEL = """
local f = redis.call('HMGET', KEYS[1], 'status', 'run_id')
if not f[1] then return -1 end
if TERM[f[1]] then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', 1, 'due_at', ARGV[1])
reindex(KEYS[1])
redis.call('PUBLISH', ARGV[2], f[2])
return 1
"""

_SCRIPTS = dict(
    create=_CREATE,
    claim=_CLAIM,
    read=_READ,
    append=_APPEND,
    rewrite=_REWRITE,
    renew=_RENEW,
    release=_RELEASE,
    deliver=_DELIVER,
    cancel=_CANCEL,
)


def _num(x: float) -> str:
    return repr(float(x))


def _opt(x: str | float | int | None) -> str:
    """Optional script argument: '' = None, else '=' + the value."""
    if x is None:
        return ""
    if isinstance(x, float):
        return "=" + _num(x)
    return f"={x}"


def redact(url: str) -> str:
    """The URL without credentials or query (which may hold ``password=``)."""
    try:
        p = urlsplit(url)
        host = p.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{p.port}" if p.port else "")
    except ValueError:
        return "<unparseable redis URL>"
    if p.username or p.password:
        netloc = "***@" + netloc
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


def _secrets(url: str) -> list[str]:
    try:
        p = urlsplit(url)
        found = [p.password or "", unquote(p.password or "")]
        for key, values in parse_qs(p.query).items():
            if key.lower() in ("password", "username", "user"):
                found += values
    except ValueError:
        return []
    return sorted({s for s in found if s}, key=len, reverse=True)


def _record(h: dict[bytes, bytes]) -> RunRecord:
    d = {k.decode(): v.decode() for k, v in h.items()}

    def f(k: str) -> float | None:
        return float(d[k]) if k in d else None

    return RunRecord(
        run_id=d["run_id"],
        workflow=d["workflow"],
        queue=d["queue"],
        status=RunStatus(d["status"]),
        created_at=float(d["created_at"]),
        started_at=f("started_at"),
        ended_at=f("ended_at"),
        due_at=f("due_at"),
        result=json.loads(d["result"]) if "result" in d else None,
        error=d.get("error"),
        log_len=int(d["log_len"]),
        inbox_pos=int(d["inbox_pos"]),
        lease_token=int(d["lease_token"]),
        lease_owner=d.get("lease_owner"),
        lease_expires_at=f("lease_expires_at"),
        cancel_requested="cancel_requested" in d,
        parent_id=d.get("parent_id"),
    )


def _raise_if_cancelled() -> None:
    """redis-py can swallow a cancellation that races with its own read timeout (the
    CancelledError becomes a timeout); a pending cancel request must still win."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _cmd(c: aioredis.Redis | aioredis.client.Pipeline, *args: Any) -> Awaitable[Any]:
    """One raw command (redis-py's typed wrappers return ``Awaitable | value`` unions)."""
    return c.execute_command(*args)


class RedisBackend:
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
        self._safe_url = redact(url)
        self._secret_values = _secrets(url)
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
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secret_values:
            text = text.replace(secret, "***")
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
            for src in _SCRIPTS.values():
                await client.script_load(_PRELUDE + src)
        except (RedisError, OSError) as exc:
            await client.aclose()
            await pool.aclose()
            raise BackendUnavailable(self._describe("is unreachable", exc)) from exc
        self._scripts = {
            name: client.register_script(_PRELUDE + src) for name, src in _SCRIPTS.items()
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
                _raise_if_cancelled()
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
        ]
        args = [
            rid,
            new.workflow,
            new.queue,
            _num(new.created_at),
            _opt(new.due_at),
            _opt(new.parent_id),
            new.first_record,
            uuid.uuid4().hex,
            self._channel,
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
    ) -> list[Claim]:
        if limit <= 0 or not workflows:
            self._count("claim_due")
            return []
        keys = [self._due_key(queue, wf) for wf in sorted(set(workflows))]
        args = [_num(now), owner, _num(now + lease_seconds), limit, f"{self._tag}:run:"]
        flat = await self._script("claim_due", "claim", keys, args)
        return [
            Claim(run_id=flat[i].decode(), token=int(flat[i + 1])) for i in range(0, len(flat), 2)
        ]

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None:
        keys = [self._key("run", run_id), self._key("log", run_id), self._key("inbox", run_id)]
        reply = await self._script("read", "read", keys, [log_from])
        if reply is None:
            return None
        rec = _record(dict(zip(reply[0][::2], reply[0][1::2], strict=True)))
        inbox = [InboxItem(id=rec.inbox_pos + 1 + i, data=d) for i, d in enumerate(reply[2])]
        return Snapshot(run=rec, log=list(reply[1]), inbox=inbox)

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
        u = update or RunUpdate()
        result = _opt(json.dumps(u.result, separators=(",", ":"))) if u.has_result else ""
        args: list[Any] = [
            token,
            expected_len,
            _num(now),
            self._channel,
            uuid.uuid4().hex,
            _opt(u.status.value if u.status is not None else None),
            result,
            _opt(u.error),
            _opt(u.ended_at),
            _opt(u.inbox_pos),
            "1" if u.release else "0",
            "0" if update is None else "1",
            _opt(u.due_at),
            *records,
        ]
        return await self._fenced("append", "append", run_id, expected_len, args)

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
        return await self._fenced("rewrite_log", "rewrite", run_id, expected_len, args)

    async def _fenced(
        self, op: str, script: str, run_id: str, expected_len: int, args: Sequence[Any]
    ) -> int:
        """Run a log-writing script (token and length fence); returns the new log length."""
        keys = [self._key("run", run_id), self._key("log", run_id)]
        code, *rest = await self._script(op, script, keys, args)
        if code == -1:
            raise RunNotFound(run_id)
        if code == -2:
            raise LeaseLost(run_id)
        if code == -3:
            raise LeaseLost(
                run_id, f"run {run_id!r}: log length is {rest[0]}, expected {expected_len}"
            )
        return int(rest[0])

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        if not leases:
            return set()
        ids = list(leases)
        keys = [self._key("run", rid) for rid in ids]
        args = [_num(now + lease_seconds), *(leases[rid] for rid in ids)]
        held = await self._script("renew", "renew", keys, args)
        return {rid for rid, ok in zip(ids, held, strict=True) if ok}

    async def release(
        self, run_id: str, *, token: int, due_at: float | None, status: RunStatus, now: float
    ) -> bool:
        args = [token, _opt(due_at), status.value, _num(now), uuid.uuid4().hex, self._channel]
        return bool(await self._script("release", "release", [self._key("run", run_id)], args))

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        keys = [
            self._key("run", run_id),
            self._key("inbox", run_id),
            self._key("nonce", uuid.uuid4().hex),
        ]
        code, *rest = await self._script(
            "deliver", "deliver", keys, [data, _num(now), self._channel]
        )
        if code == -1:
            raise RunNotFound(run_id)
        if code == -2:
            raise RunFinished(run_id, rest[0].decode())
        return int(rest[0])

    async def request_cancel(self, run_id: str, *, now: float) -> None:
        args = [_num(now), self._channel]
        code = await self._script("request_cancel", "cancel", [self._key("run", run_id)], args)
        if code == -1:
            raise RunNotFound(run_id)

    async def get_run(self, run_id: str) -> RunRecord | None:
        self._count("get_run")
        key = self._key("run", run_id)
        h = await self._exec("get_run", lambda c: _cmd(c, "HGETALL", key))
        return _record(h) if h else None

    async def list_runs(
        self,
        *,
        workflow: str | None = None,
        statuses: Collection[RunStatus] | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs in created_at, run id order; reads in batches (not one snapshot)."""
        self._count("list_runs")
        index = f"{self._tag}:runs" if workflow is None else self._key("wf", workflow)
        wanted = None if statuses is None else set(statuses)
        enough = limit if limit is not None and limit >= 0 else None

        async def page(c: aioredis.Redis, start: int) -> list[Any]:
            ids = await _cmd(c, "ZRANGE", index, start, start + _LIST_BATCH - 1)
            pipe = c.pipeline(transaction=False)
            for rid in ids:
                _cmd(pipe, "HGETALL", self._key("run", rid.decode()))
            return await pipe.execute() if ids else []

        out: list[RunRecord] = []
        start = 0
        while enough is None or len(out) < enough:
            hashes = await self._exec("list_runs", functools.partial(page, start=start))
            if not hashes:
                break
            records = (_record(h) for h in hashes if h)
            out += [r for r in records if wanted is None or r.status in wanted]
            start += _LIST_BATCH
        return out if limit is None else out[:limit]

    # -- hints ----------------------------------------------------------------

    def subscribe(self) -> AsyncIterator[str]:
        return self._hints()

    async def _hints(self) -> AsyncIterator[str]:
        """Run ids published by the scripts; "" after a reconnection (hints may be lost)."""
        delay, dropped = 0.1, False
        while not self._closed:
            client = self._client
            if client is None:  # not open yet
                await asyncio.sleep(delay)
                continue
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                _raise_if_cancelled()
                if dropped:
                    delay, dropped = 0.1, False
                    yield ""
                while not self._closed:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    _raise_if_cancelled()
                    if msg is not None and msg.get("type") == "message":
                        yield bytes(msg["data"]).decode(errors="replace")
            except (RedisConnectionError, RedisTimeoutError, OSError):
                _raise_if_cancelled()
                dropped = True
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if dropped and not self._closed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

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
