//! The Lua scripts that change a tenant's leases atomically inside Redis.
//!
//! Every script works on one tenant's two keys, which share a hash tag (one cluster slot):
//! `KEYS[1]`, a sorted set of lease id → deadline (milliseconds, Redis's own clock), and
//! `KEYS[2]`, a hash of lease id → tokens plus the running sum under `=sum` (lease ids never
//! start with `=`). Each script first sweeps the leases whose deadline has passed, so an
//! expired lease stops counting the moment anyone looks, and ends by deleting the keys when
//! no lease is left or by pushing their expiry past the latest deadline otherwise.

use redis::Script;

/// Shared by every script: the clock, the sweep and the tidy-up.
const PRELUDE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
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
  end
end
local now = now_ms()
sweep(now)
";

/// `ARGV`: lease, tokens, cap, ttl. Returns `{status, in_flight}`: 1 admitted (or already
/// held: a retry of the same lease id admits once), 0 over the cap, -1 larger than the cap.
const RESERVE: &str = r"
local lease, tokens, cap, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local found = redis.call('HMGET', KEYS[2], '=sum', lease)
local held = tonumber(found[1]) or 0
if found[2] then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, lease)
  tidy(ttl)
  return {1, held}
end
if tokens > cap then tidy(nil) return {-1, held} end
if held + tokens > cap then tidy(nil) return {0, held} end
redis.call('HSET', KEYS[2], lease, ARGV[2])
held = redis.call('HINCRBY', KEYS[2], '=sum', ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, lease)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, held}
";

/// Registers lease `lease` again with `tokens`, whatever the cap: Redis lost it (a restart
/// without persistence, a flush, a failover to a lagging replica, or an expiry while its
/// replica was cut off), but its replica still holds it and the work is running.
const REGISTER_AGAIN: &str = r"
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

/// `ARGV`: lease. Idempotent. Returns `{released, in_flight}`.
const RELEASE: &str = r"
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if old then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HINCRBY', KEYS[2], '=sum', -old)
end
tidy(nil)
return {old and 1 or 0, sum()}
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

/// No `ARGV`. Returns `{in_flight, leases}` after the sweep.
const STATE: &str = r"
tidy(nil)
return {sum(), redis.call('ZCARD', KEYS[1])}
";

/// The scripts, hashed once; `redis::Script` loads one again when the server answers
/// `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
pub(crate) struct Scripts {
    pub(crate) reserve: Script,
    pub(crate) resize: Script,
    pub(crate) release: Script,
    pub(crate) renew: Script,
    pub(crate) state: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{REGISTER_AGAIN}{body}"));
        Self {
            reserve: script(RESERVE),
            resize: script(RESIZE),
            release: script(RELEASE),
            renew: script(RENEW),
            state: script(STATE),
        }
    }
}
