//! The Lua scripts that change a tenant's leases atomically inside Redis.
//!
//! Every script works on one tenant's two keys, which share a hash tag (one cluster slot):
//! `KEYS[1]`, a sorted set of lease id → deadline (milliseconds, Redis's own clock), and
//! `KEYS[2]`, a hash of lease id → tokens plus the running sum under `=sum` and the keys'
//! expiry under `=exp` (lease ids never start with `=`). Resizing, renewing and reading the state first sweep the leases whose
//! deadline has passed; the batch of reservations and releases, the hot path, sweeps a
//! tenant only before refusing it, so an expired lease never refuses anyone. Scripts end by
//! deleting the keys when no lease is left or by pushing their expiry past the latest
//! deadline otherwise; the batch pushes it (to two TTLs) only when a new deadline would
//! pass the expiry `=exp` records, so most reservations skip it.

use redis::Script;

/// Shared by every script: the clock, the sweep and the tidy-up.
pub(super) const PRELUDE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local now = now_ms()
local function sum()
  return tonumber(redis.call('HGET', KEYS[2], '=sum')) or 0
end
local function sweep(now)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  if #expired == 0 then return end
  local freed = 0
  for _, lease in ipairs(expired) do
    freed = freed + (tonumber(redis.call('HGET', KEYS[2], lease)) or 0)
    redis.call('HDEL', KEYS[2], lease)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HINCRBY', KEYS[2], '=sum', -freed)
end
local function tidy(ttl)
  if redis.call('ZCARD', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[1], KEYS[2])
  elseif ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('HSET', KEYS[2], '=exp', now + ttl)
  end
end
sweep(now)
";

/// Registers lease `lease` again with `tokens`, whatever the cap: Redis lost it (a restart
/// without persistence, a flush, a failover to a lagging replica, or an expiry while its
/// replica was cut off), but its replica still holds it and the work is running.
pub(super) const REGISTER_AGAIN: &str = r"
local function register_again(lease, tokens, ttl)
  redis.call('HSET', KEYS[2], lease, tokens)
  redis.call('HINCRBY', KEYS[2], '=sum', tokens)
  redis.call('ZADD', KEYS[1], now + ttl, lease)
end
";

/// `ARGV`: lease, tokens, cap (empty: unchecked growth), ttl, the tokens the lease holds
/// now. Returns `{status, in_flight, registered_again}`: status 1 set, 0 growth over the
/// cap (the tokens unchanged); `registered_again` 1 when the lease had been lost and was
/// registered again with the tokens it holds now first.
const RESIZE: &str = r"
local lease, tokens, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local cap = tonumber(ARGV[3])
local old = tonumber(redis.call('HGET', KEYS[2], lease))
local again = 0
if not old then
  old = tonumber(ARGV[5])
  register_again(lease, old, ttl)
  again = 1
end
local held = sum()
if cap and tokens > old and held - old + tokens > cap then tidy(ttl) return {0, held, again} end
redis.call('HSET', KEYS[2], lease, ARGV[2])
held = redis.call('HINCRBY', KEYS[2], '=sum', tokens - old)
redis.call('ZADD', KEYS[1], 'XX', now + ttl, lease)
tidy(ttl)
return {1, held, again}
";

/// `ARGV`: ttl, then pairs of lease id and the tokens it holds. Pushes the deadline of each
/// lease; one Redis no longer has (expired, or lost with the server's data) is registered
/// again with its tokens, whatever the cap. Returns `{in_flight, {ids registered again}}`.
const RENEW: &str = r"
local ttl = tonumber(ARGV[1])
local again = {}
for i = 2, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
  else
    register_again(ARGV[i], tonumber(ARGV[i + 1]), ttl)
    again[#again + 1] = ARGV[i]
  end
end
tidy(ttl)
return {sum(), again}
";

/// Reservations and releases in one call, each on its own tenant's keys: `KEYS` are the
/// pairs of keys, one pair an operation, and `ARGV` the ttl, then four values an operation:
/// `r` (reserve) or `x` (release), the lease, its tokens and the cap (both ignored by a
/// release). Returns two numbers an operation, in order: for a reservation its status (1
/// admitted, or already held: a retry of the same lease id admits once; 0 over the cap;
/// -1 larger than the cap) and the tenant's tokens in flight; for a release 1 if the lease
/// was there (releasing is idempotent) and the tokens in flight after it.
///
/// It sweeps a tenant's expired leases only where that can change an answer: before a
/// reservation is refused (and only when the earliest deadline has passed), so the common
/// path pays for no sweep. Expired leases left meanwhile still count in the figure
/// returned until a refusal, a renewal or a look at the state sweeps them; they never
/// refuse a request. A release deletes the keys when the last lease goes. Standalone: it
/// needs none of the prelude.
const BATCH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local out = {}
local function sweep(deadlines, tokens, held)
  local first = redis.call('ZRANGE', deadlines, 0, 0, 'WITHSCORES')
  if not first[2] or tonumber(first[2]) > now then return held end
  local expired = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now)
  local freed = 0
  for _, gone in ipairs(expired) do
    freed = freed + (tonumber(redis.call('HGET', tokens, gone)) or 0)
    redis.call('HDEL', tokens, gone)
  end
  redis.call('ZREMRANGEBYSCORE', deadlines, '-inf', now)
  return redis.call('HINCRBY', tokens, '=sum', -freed)
end
for op = 0, #KEYS / 2 - 1 do
  local deadlines, tokens = KEYS[2 * op + 1], KEYS[2 * op + 2]
  local a = 4 * op + 2
  local lease = ARGV[a + 1]
  if ARGV[a] == 'r' then
    local want, cap = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local found = redis.call('HMGET', tokens, '=sum', lease, '=exp')
    local held = tonumber(found[1]) or 0
    local status = 1
    if found[2] then
      redis.call('ZADD', deadlines, 'XX', now + ttl, lease)
    elseif want > cap then
      status = -1
    else
      if held + want > cap then held = sweep(deadlines, tokens, held) end
      if held + want > cap then
        status = 0
      elseif not found[1] then
        -- The tenant's first lease: its keys are made here, each field in one call.
        redis.call('HSET', tokens, lease, ARGV[a + 2], '=sum', ARGV[a + 2], '=exp', now + 2 * ttl)
        redis.call('ZADD', deadlines, now + ttl, lease)
        redis.call('PEXPIRE', deadlines, 2 * ttl)
        redis.call('PEXPIRE', tokens, 2 * ttl)
        found[3] = now + 2 * ttl
        held = want
      else
        held = held + want
        redis.call('HSET', tokens, lease, ARGV[a + 2], '=sum', string.format('%d', held))
        redis.call('ZADD', deadlines, now + ttl, lease)
      end
    end
    if status == 1 and (tonumber(found[3]) or 0) < now + ttl then
      redis.call('PEXPIRE', deadlines, 2 * ttl)
      redis.call('PEXPIRE', tokens, 2 * ttl)
      redis.call('HSET', tokens, '=exp', now + 2 * ttl)
    end
    out[#out + 1] = status
    out[#out + 1] = held
  else
    local found = redis.call('HMGET', tokens, lease, '=sum')
    local old = tonumber(found[1])
    local held = tonumber(found[2]) or 0
    if old then
      redis.call('HDEL', tokens, lease)
      redis.call('ZREM', deadlines, lease)
      held = held - old
    end
    if held == 0 and redis.call('ZCARD', deadlines) == 0 then
      redis.call('DEL', deadlines, tokens)
    elseif old then
      redis.call('HSET', tokens, '=sum', string.format('%d', held))
    end
    out[#out + 1] = old and 1 or 0
    out[#out + 1] = held
  end
end
return out
";

/// No `ARGV`. Returns `{in_flight, leases}` after the sweep.
const STATE: &str = r"
tidy(nil)
return {sum(), redis.call('ZCARD', KEYS[1])}
";

/// The scripts, hashed once; `redis::Script` loads one again when the server answers
/// `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
pub(crate) struct Scripts {
    pub(crate) batch: Script,
    pub(crate) resize: Script,
    pub(crate) renew: Script,
    pub(crate) state: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{REGISTER_AGAIN}{body}"));
        Self {
            batch: Script::new(BATCH),
            resize: script(RESIZE),
            renew: script(RENEW),
            state: script(STATE),
        }
    }
}
