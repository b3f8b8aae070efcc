"""Queue limits in the Redis store: the limited claim, one Lua script (atomic).

A claim under :class:`~substantial.backends.QueueLimits` with a concurrency or a
rate, or one that orders by priority, runs ``CLAIM_LIMITED``; any other claim keeps
the plain script (``_redis_lua``). Lua cannot call ``_rules.LimitGate``, so the
script mirrors it (the conformance suite and a differential test against the
memory store hold it to that), fed by structures the scripts keep in step with the
run hashes (``P`` = the prefix, ``n`` = the byte length of the queue name, so the
names are unambiguous; all under the prefix's hash tag, one Cluster slot)::

    {P}:lease:<n>:<queue>-        zset    the queue's unkeyed runs holding a lease,
    {P}:lease:<n>:<queue>=<key>   zset    and those of concurrency key <key>; score =
                                          lease_expires_at. ``reindex`` (run by every
                                          script that changes a run) adds a run while
                                          it has a lease owner and is not terminal,
                                          else removes it, so claims of every kind,
                                          renewals, releases, ends and reopens keep it.
    {P}:keyed:<n>:<queue>         string  how many runs of the queue with a key are
                                          not terminal (``reindex``, keyed runs only)
    {P}:rated:<n>:<queue>         string  set (to the longest period) by each claim
                                          with a rate, expiring RATED_TTL after the
                                          last: while it exists, every claim of the
                                          queue, limited or not, records its starts
    {P}:starts:<n>:<queue>        zset    first claims: run id, score = the claim's
                                          ``now``; trimmed to the rated period + 1 s

Concurrency: one zset per slot group, so a claim counts a group's live leases
(entries scored above ``now``) with a ``ZREMRANGEBYSCORE`` (the lazy cleanup of
expired leases: a dead worker's) and a ``ZCARD``, once per group its candidates
belong to. A group full at a point of the claim stays full for the rest of it, so
its candidates are dropped before the sort; a queue without keyed runs whose one
group is full ends the claim at once.

Rate: the window is the starts zset above ``now - period`` (the exact bound comes
from Python; Lua never formats a float): a never-started run is admitted while
fewer than ``rate`` of them are there, else ``held_until`` = the start that frees
first + ``period`` (computed in Python from the stored score, as ``LimitGate``
does). The starts are recorded from a queue's first rate-limited claim on: runs
that started before it (and after RATED_TTL without one) are not counted.

Order: the candidates are the entries due now of the claimer's workflow indexes,
read in rounds (``CHUNK`` per index, doubling; each round takes a prefix of the
indexes merged by score) and sorted by the claim order (``_rules.claim_order``:
true due time, as an index score is the later of due time and lease expiry) within
a round; priority order reads all in one round and sorts them. At most ``SCAN``
entries per index are read (a script blocks the server while it runs): a backlog
deeper than that is reached as the entries before it are claimed; an expired
lease's run is found at its score. Like the plain claim, a lost reply is not
de-duplicated: its runs stay leased (and started) until the lease expires.

Runs leased by a version of the store without these indexes are counted from their
next renewal on (``renew`` reindexes the run).
"""

from __future__ import annotations

from typing import Any

from ._protocol import Claim, Claims, QueueLimits
from ._redis_codec import num

SCAN = 512  # due entries a limited claim reads at most per workflow index (or ``limit``)
RATED_TTL = 86400  # seconds a queue records starts after its last rate-limited claim
CHUNK = 64  # the first read per index of a claim in due order (or ``2 * limit``), doubling

# KEYS starts, rated, keyed, then the due indexes of the claimer's workflows; ARGV now,
# owner, expiry, limit, run-key prefix, "{P}:", queue, concurrency?, rate?, window start
# (now - period), priority ('1' or '0'), scan, chunk, period, rated's ttl. Returns
# {held start or '', id, token, id, token, ...}.
CLAIM_LIMITED = """
local now, limit, scan = tonumber(ARGV[1]), tonumber(ARGV[4]), tonumber(ARGV[12])
local conc, rate = tonumber(ARGV[8]), tonumber(ARGV[9])
local byprio = ARGV[11] == '1'
local starts, period = KEYS[1], tonumber(ARGV[14])
local rated = tonumber(redis.call('GET', KEYS[2]))
if rate then  -- from now on every claim of the queue records its first claims
  if rated == nil or period > rated then
    redis.call('SET', KEYS[2], ARGV[14], 'EX', ARGV[15])
    rated = period
  else
    redis.call('EXPIRE', KEYS[2], ARGV[15])
  end
end
-- (a margin below the longest window: Redis formats this bound, not exactly the caller)
if rated then redis.call('ZREMRANGEBYSCORE', starts, '-inf', now - rated - 1) end
local base, nstarts = 0, 0  -- the starts at or before the window, and in it
if rate then
  base = redis.call('ZCOUNT', starts, '-inf', ARGV[10])
  nstarts = redis.call('ZCARD', starts) - base
end
local busy, held, out, seen, lks = {}, nil, {''}, {}, {}
local function group(ck)  -- the slot group's lease index; its live leases counted once
  local lk = lks[ck]
  if lk == nil then
    lk = lease_key(ARGV[6], ARGV[7], ck)
    lks[ck] = lk
    redis.call('ZREMRANGEBYSCORE', lk, '-inf', ARGV[1])
    busy[lk] = redis.call('ZCARD', lk)
  end
  return lk
end
-- without keyed runs in the queue, a full unkeyed group holds every candidate back
local unkeyed = conc and (tonumber(redis.call('GET', KEYS[3])) or 0) <= 0
local function stuck() return unkeyed and busy[group(false)] >= conc end
local function hold()  -- the rate's window is full: when does it free a start?
  local at = base + nstarts - rate
  local s = redis.call('ZRANGE', starts, at, at, 'WITHSCORES')[2]
  if held == nil or tonumber(s) < tonumber(held) then held = s end
end
local function before(a, b)  -- the claim order (_rules.claim_order)
  if byprio and a[4] ~= b[4] then return a[4] < b[4] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  if a[3] ~= b[3] then return a[3] < b[3] end
  return a[1] < b[1]
end
local function after(s, m, bs, bm)  -- index order: (score, member) past the bound
  return bs ~= nil and (s > bs or (s == bs and m > bm))
end
-- one entry of index i, due by its score: nil if it left the due range (stale), false
-- if its group is full (then it stays so for this claim), else the candidate
local function candidate(i, id)
  local rk = ARGV[5] .. id
  local f = redis.call('HMGET', rk, 'status', 'due_at', 'lease_expires_at', 'lease_token',
    'started_at', 'created_at', 'priority', 'concurrency_key')
  if not f[1] then
    redis.call('ZREM', KEYS[i], id)
    return nil
  end
  if TERM[f[1]] or not f[2] or tonumber(f[2]) > now or (f[3] and tonumber(f[3]) > now) then
    reindex(rk)
    return nil
  end
  local lk = conc and group(f[8]) or nil
  if lk and busy[lk] >= conc then return false end
  return {id, tonumber(f[2]), tonumber(f[6]) or 0, tonumber(f[7]) or 0, tonumber(f[4]) + 1,
    f[5], lk, i}
end
local off, nread, done = {}, {}, {}
for i = 4, #KEYS do off[i], nread[i], done[i] = 0, 0, false end
local chunk = byprio and scan or math.min(scan, tonumber(ARGV[13]))
while #out <= 2 * limit and not stuck() do
  -- read the next entries of each index; take them up to the first bound of an index
  -- that has more, so a round takes a prefix of the merged (score, member) order
  local reads, bs, bm = {}, nil, nil
  for i = 4, #KEYS do
    if not done[i] then
      local want = math.min(chunk, scan - nread[i])
      local r = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'WITHSCORES',
        'LIMIT', off[i], want)
      reads[i] = r
      if not byprio and #r == 2 * want and nread[i] + want < scan then
        local s, m = tonumber(r[#r]), r[#r - 1]
        if bs == nil or s < bs or (s == bs and m < bm) then bs, bm = s, m end
      end
    end
  end
  if next(reads) == nil then break end
  local cands, left, took, first = {}, {}, {}, nil
  for i, r in pairs(reads) do
    left[i], took[i] = 0, 0
    for j = 1, #r, 2 do
      if after(tonumber(r[j + 1]), r[j], bs, bm) then break end
      took[i] = took[i] + 1
      local c = nil
      if seen[r[j]] == nil then c = candidate(i, r[j]) end
      if c == nil and seen[r[j]] == nil then left[i] = left[i] + 1
      elseif c and rate and not conc and not c[6] and (rate <= 0 or nstarts >= rate) then
        -- the window stays full: every such run is held alike; the first one counts
        if first == nil or before(c, first) then first = c end
      elseif c then
        cands[#cands + 1] = c
      end
    end
    done[i] = took[i] == #r / 2 and (#r / 2 < chunk or nread[i] + took[i] >= scan)
  end
  if first then cands[#cands + 1] = first end
  table.sort(cands, before)
  for _, c in ipairs(cands) do
    if #out > 2 * limit or stuck() then break end
    local ok = not (c[7] and busy[c[7]] >= conc)
    if ok and rate and not c[6] then
      if rate <= 0 then  -- a zero rate holds every start, for no time in particular
        ok = false
      elseif nstarts >= rate then
        hold()
        ok = false
      end
    end
    if ok then
      local rk = ARGV[5] .. c[1]
      if c[6] then
        redis.call('HSET', rk, 'status', 'RUNNING', 'lease_token', c[5],
          'lease_owner', ARGV[2], 'lease_expires_at', ARGV[3])
      else
        redis.call('HSET', rk, 'status', 'RUNNING', 'lease_token', c[5],
          'lease_owner', ARGV[2], 'lease_expires_at', ARGV[3], 'started_at', ARGV[1])
        if rated then
          redis.call('ZADD', starts, ARGV[1], c[1])
          nstarts = nstarts + 1
        end
      end
      reindex(rk)
      if c[7] then busy[c[7]] = busy[c[7]] + 1 end
      seen[c[1]] = true
      if tonumber(ARGV[3]) > now then left[c[8]] = left[c[8]] + 1 end
      out[#out + 1] = c[1]
      out[#out + 1] = c[5]
    end
  end
  for i in pairs(reads) do
    off[i], nread[i] = off[i] + took[i] - left[i], nread[i] + took[i]
    if byprio or nread[i] >= scan then done[i] = true end
  end
  chunk = math.min(2 * chunk, scan)
end
if held then out[1] = held end
return out
"""


def claim_args(
    tag: str,
    queue: str,
    limits: QueueLimits,
    now: float,
    owner: str,
    lease_seconds: float,
    limit: int,
) -> list[Any]:
    """``CLAIM_LIMITED``'s ARGV. Times travel as ``repr`` text (the window start is
    computed here, as the memory store computes it: Lua never formats a float)."""
    return [
        num(now),
        owner,
        num(now + lease_seconds),
        limit,
        f"{tag}:run:",
        f"{tag}:",
        queue,
        "" if limits.concurrency is None else limits.concurrency,
        "" if limits.rate is None else limits.rate,
        "" if limits.rate is None else num(now - limits.period),
        "1" if limits.priority else "0",
        max(SCAN, limit),
        max(CHUNK, 2 * limit),
        num(limits.period),
        int(max(RATED_TTL, 2 * limits.period)) + 1,
    ]


def keys(tag: str, queue: str) -> list[str]:
    """The starts and rated keys of ``queue`` (see the module docstring)."""
    name = f"{len(queue.encode())}:{queue}"
    return [f"{tag}:starts:{name}", f"{tag}:rated:{name}", f"{tag}:keyed:{name}"]


def parse_claims(reply: Any, limits: QueueLimits) -> Claims:
    """The script's reply: the claims, and ``held_until`` = the window start that
    frees first (``held``, as stored) + the period, computed as ``LimitGate`` does."""
    held, flat = reply[0], reply[1:]
    claims = (
        Claim(run_id=flat[i].decode(), token=int(flat[i + 1])) for i in range(0, len(flat), 2)
    )
    return Claims(claims, held_until=float(held) + limits.period if held else None)
