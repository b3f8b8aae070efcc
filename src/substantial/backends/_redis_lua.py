"""Lua of the Redis store: one script per protocol operation, each atomic.

Every script is sent with ``PRELUDE`` in front (the terminal statuses, ``opt`` for
optional arguments, and the shared ``recount`` / ``lease_key`` / ``reindex`` /
``release`` rules). Key layout and argument conventions are described in
``redis.py``; the limited claim and its indexes in ``_redis_limits.py``; the
published state's hash and its marker in ``_redis_state.py``.
"""

from __future__ import annotations

from .._types import RunStatus
from ._redis_limits import CLAIM_LIMITED
from ._redis_state import ROWS

NONCE_TTL = 300  # seconds a delivery's nonce is kept (retry de-duplication)

PRELUDE = (
    "local TERM = {"
    + ", ".join(f"{s.value}=true" for s in RunStatus if s.is_terminal)
    + "}\n"
    + """
local function opt(a) if a == '' then return nil end return string.sub(a, 2) end
local function counted(rk, tagc, id, wf, status, was)
  if was == status then return end
  local ck = tagc .. 'counts'
  if was then redis.call('HINCRBY', ck, was .. ':' .. wf, -1) end
  redis.call('HINCRBY', ck, status .. ':' .. wf, 1)
  redis.call('HSET', rk, 'counted', status)
end
local function recount(rk)
  local f = redis.call('HMGET', rk, 'run_id', 'workflow', 'status', 'counted')
  counted(rk, string.sub(rk, 1, #rk - #f[1] - 4), f[1], f[2], f[3], f[4])
end
local function lease_key(tagc, queue, ck)
  if ck then return tagc .. 'lease:' .. #queue .. ':' .. queue .. '=' .. ck end
  return tagc .. 'lease:' .. #queue .. ':' .. queue .. '-'
end
local function reindex(rk)
  local f = redis.call('HMGET', rk, 'run_id', 'dkey', 'status', 'due_at', 'lease_expires_at',
    'lease_owner', 'queue', 'concurrency_key', 'workflow', 'counted', 'keyed')
  local tagc = string.sub(rk, 1, #rk - #f[1] - 4)
  counted(rk, tagc, f[1], f[9], f[3], f[10])
  if f[8] and (not TERM[f[3]]) ~= (f[11] ~= false) then  -- the queue's keyed runs
    local kk = tagc .. 'keyed:' .. #f[7] .. ':' .. f[7]
    if f[11] then
      redis.call('DECR', kk)
      redis.call('HDEL', rk, 'keyed')
    else
      redis.call('INCR', kk)
      redis.call('HSET', rk, 'keyed', 1)
    end
  end
  local lk = lease_key(tagc, f[7], f[8])
  if f[6] and f[5] and not TERM[f[3]] then redis.call('ZADD', lk, f[5], f[1])
  else redis.call('ZREM', lk, f[1]) end
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

# KEYS run, log, runs, wf, due, state; ARGV id, workflow, queue, created, due?, parent?,
# first, nonce, channel, priority, concurrency_key?, ns, ns state entries (key, JSON, ...),
# more records...
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'create_nonce') == ARGV[8] then return 1 end
  return 0
end
local ns = tonumber(ARGV[12])
redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'workflow', ARGV[2], 'queue', ARGV[3],
  'status', 'PENDING', 'created_at', ARGV[4], 'log_len', #ARGV - 11 - ns, 'inbox_pos', 0,
  'lease_token', 0, 'priority', ARGV[10], 'st', 1,
  'last_inbox_id', 0, 'dkey', KEYS[5], 'create_nonce', ARGV[8])
local due = opt(ARGV[5])
if due then redis.call('HSET', KEYS[1], 'due_at', due) end
local parent = opt(ARGV[6])
if parent then redis.call('HSET', KEYS[1], 'parent_id', parent) end
local ck = opt(ARGV[11])
if ck then redis.call('HSET', KEYS[1], 'concurrency_key', ck) end
redis.call('DEL', KEYS[2], KEYS[6])
redis.call('RPUSH', KEYS[2], ARGV[7])
for i = 13 + ns, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
for i = 13, 12 + ns, 1000 do
  redis.call('HSET', KEYS[6], unpack(ARGV, i, math.min(i + 999, 12 + ns)))
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
reindex(KEYS[1])
redis.call('PUBLISH', ARGV[9], ARGV[1])
return 1
"""

# KEYS the due indexes of the claimer's workflows; ARGV now, owner, expiry, limit, run-key
# prefix, the queue's starts and rated keys, the store's key prefix (the unlimited claim:
# the limited one, and those keys, are in _redis_limits.py; a rated queue's claims record
# their first claims). Each claim comes with what ``read`` would return right after it
# (run hash, whole log, pending inbox, state hash): the worker's read costs no round trip.
_CLAIM = """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[4])
local rated = tonumber(redis.call('GET', ARGV[7]))
if rated then redis.call('ZREMRANGEBYSCORE', ARGV[6], '-inf', now - rated - 1) end
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
  if #out >= limit then break end
  local rk = ARGV[5] .. c[1]
  local f = redis.call('HMGET', rk, 'status', 'due_at', 'lease_expires_at', 'lease_token',
    'started_at')
  if not f[1] then
    redis.call('ZREM', c[4], c[1])
  elseif not TERM[f[1]] and f[2] and tonumber(f[2]) <= now
      and (not f[3] or tonumber(f[3]) <= now) then
    local tok = tonumber(f[4]) + 1
    if f[5] then
      redis.call('HSET', rk, 'status', 'RUNNING', 'lease_token', tok, 'lease_owner', ARGV[2],
        'lease_expires_at', ARGV[3])
    else
      redis.call('HSET', rk, 'status', 'RUNNING', 'lease_token', tok, 'lease_owner', ARGV[2],
        'lease_expires_at', ARGV[3], 'started_at', ARGV[1])
      if rated then redis.call('ZADD', ARGV[6], ARGV[1], c[1]) end
    end
    reindex(rk)
    local pos = redis.call('HGET', rk, 'inbox_pos')
    out[#out + 1] = {c[1], tok, redis.call('HGETALL', rk),
      redis.call('LRANGE', ARGV[8] .. 'log:' .. c[1], 0, -1),
      redis.call('LRANGE', ARGV[8] .. 'inbox:' .. c[1], pos, -1),
      redis.call('HGETALL', ARGV[8] .. 'state:' .. c[1])}
  else
    reindex(rk)
  end
end
return out
"""

# KEYS run, log, inbox, state; ARGV log_from
_READ = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
local pos = redis.call('HGET', KEYS[1], 'inbox_pos')
return {h, redis.call('LRANGE', KEYS[2], ARGV[1], -1), redis.call('LRANGE', KEYS[3], pos, -1),
  redis.call('HGETALL', KEYS[4])}
"""

# KEYS run, log, state; ARGV start, stop (exclusive)
_READ_PAGE = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
local page = {}
if tonumber(ARGV[2]) > tonumber(ARGV[1]) then
  page = redis.call('LRANGE', KEYS[2], ARGV[1], tonumber(ARGV[2]) - 1)
end
return {h, page, redis.call('HGETALL', KEYS[3])}
"""

# The fence every log-writing script opens with (ARGV token, expected_len, nonce):
# the lease must be the caller's and the log as long as it expects; a retry of the
# write that landed (same nonce) gets its first answer again.
_FENCED = """
local rk = KEYS[1]
local f = redis.call('HMGET', rk, 'lease_token', 'log_len', 'op_nonce', 'op_result')
if not f[1] then return {-1} end
if tonumber(f[1]) ~= tonumber(ARGV[1]) then return {-2} end
if f[3] == ARGV[3] then return {1, tonumber(f[4])} end
if tonumber(f[2]) ~= tonumber(ARGV[2]) then return {-3, tonumber(f[2])} end
"""


def _push_from(first: str, last: str = "#ARGV") -> str:
    """RPUSH ARGV[first..last] onto the log in chunks (Lua's unpack has a limit)."""
    return f"""for i = {first}, {last}, 1000 do
  n = redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, {last})))
end
redis.call('HSET', rk, 'log_len', n, 'op_nonce', ARGV[3], 'op_result', n)
"""


# KEYS run, log; ARGV token, expected_len, nonce, records... (a step's append: records
# alone, the common write, with the fewest arguments to send and parse)
_APPEND_RECORDS = _FENCED + "local n = tonumber(f[2])\n" + _push_from("4") + "return {1, n}\n"

# KEYS run, log, state; ARGV token, expected_len, nonce, now, channel, status?, result?,
# error?, ended_at?, inbox_pos?, release, due?, error_type?, ns, ns state entries (key,
# JSON, ...: written only to a run that keeps the index), records...
_APPEND = (
    _FENCED
    + "local n, ns = tonumber(f[2]), tonumber(ARGV[14])\n"
    + _push_from("15 + ns")
    + """if ns > 0 and redis.call('HEXISTS', rk, 'st') == 1 then
  for i = 15, 14 + ns, 1000 do
    redis.call('HSET', KEYS[3], unpack(ARGV, i, math.min(i + 999, 14 + ns)))
  end
end
local names = {[6] = 'status', [7] = 'result', [8] = 'error', [9] = 'ended_at',
  [10] = 'inbox_pos', [13] = 'error_type'}
for i, name in pairs(names) do
  local v = opt(ARGV[i])
  if v then redis.call('HSET', rk, name, v) end
end
if ARGV[11] == '1' or TERM[redis.call('HGET', rk, 'status')] then
  release(rk, opt(ARGV[12]), ARGV[4])
  redis.call('PUBLISH', ARGV[5], redis.call('HGET', rk, 'run_id'))
elseif ARGV[6] ~= '' then
  recount(rk)
end
return {1, n}
"""
)

# KEYS run, log; ARGV token, expected_len, nonce, records...
_REWRITE = (
    _FENCED + "redis.call('DEL', KEYS[2])\nlocal n = 0\n" + _push_from("4") + "return {1, n}\n"
)

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
""".replace("@TTL@", str(NONCE_TTL))

# KEYS run; ARGV now, channel, revert ('1' or '')
_CANCEL = """
local f = redis.call('HMGET', KEYS[1], 'status', 'run_id')
if not f[1] then return -1 end
if TERM[f[1]] then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', 1, 'due_at', ARGV[1])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'revert_requested', 1) end
reindex(KEYS[1])
redis.call('PUBLISH', ARGV[2], f[2])
return 1
"""

# KEYS run, log; ARGV status, expected_len, keep_len, now, channel
_REOPEN = """
local f = redis.call('HMGET', KEYS[1], 'status', 'log_len', 'run_id')
if not f[1] then return -1 end
if f[1] ~= ARGV[1] or tonumber(f[2]) ~= tonumber(ARGV[2]) then return 0 end
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
redis.call('HDEL', KEYS[1], 'ended_at', 'result', 'error', 'error_type', 'lease_owner',
    'lease_expires_at', 'cancel_requested', 'revert_requested')
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'due_at', ARGV[4], 'log_len', ARGV[3])
reindex(KEYS[1])
redis.call('PUBLISH', ARGV[5], f[3])
return 1
"""

# KEYS counts, counted (set once every run was counted); ARGV -
_COUNTS = """
if redis.call('EXISTS', KEYS[2]) == 0 then return false end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS counts (it names the slot); ARGV the run-key prefix, run ids (a batch of the walk
# that counts the runs older than the counters, see redis.py)
_RECOUNT = """
for i = 2, #ARGV do
  local rk = ARGV[1] .. ARGV[i]
  if redis.call('EXISTS', rk) == 1 then recount(rk) end
end
return #ARGV - 1
"""

SCRIPTS = dict(
    create=_CREATE,
    claim=_CLAIM,
    claim_limited=CLAIM_LIMITED,
    read=_READ,
    read_page=_READ_PAGE,
    append=_APPEND,
    append_records=_APPEND_RECORDS,
    rewrite=_REWRITE,
    renew=_RENEW,
    release=_RELEASE,
    deliver=_DELIVER,
    cancel=_CANCEL,
    reopen=_REOPEN,
    counts=_COUNTS,
    recount=_RECOUNT,
    rows=ROWS,
)
