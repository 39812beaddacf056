//! The Lua scripts that change a tenant's leases atomically inside Redis.
//!
//! Every script works on one tenant's hash, `KEYS[1]` (one key, so one cluster slot):
//!
//! - each lease id → `"<tokens>:<deadline>"` (the deadline in milliseconds of Redis's own
//!   clock);
//! - `=sum`, the tokens of all its leases (the tenant's tokens in flight);
//! - `=min`, a time no lease's deadline is earlier than (so nothing can have expired
//!   before it);
//! - `=exp`, when the key itself expires.
//!
//! Lease ids never start with `=`, and the three `=` fields are there whenever the key is.
//!
//! Expired leases are swept only where that can change an answer: before a reservation is
//! refused, and before a lease is resized or renewed or the state read, each time only once
//! `=min` has passed. A sweep reads the whole hash, drops the expired leases, and
//! counts `=sum` and `=min` again from what is left, so the common path pays for none.
//! Expired leases left meanwhile count in the figures returned until then; they never
//! refuse a request. A deadline moved later leaves `=min` early, which costs at most one
//! sweep that finds nothing, and that sweep sets `=min` right again.
//!
//! The key expires two TTLs after its latest write that needed it; its expiry is pushed
//! only when a new deadline would pass `=exp`, so most reservations skip it. It outlives
//! its last lease until then, holding `=sum` 0, rather than being deleted with it: making
//! and deleting a tenant's key costs Redis more than the reservation itself, and a tenant
//! whose requests come one at a time would pay for both on every request.

use redis::Script;

/// Shared by every script: Redis's clock, reading and writing leases, the sweep, and
/// reserving and releasing one lease.
pub(super) const CORE: &str = r"
-- Redis's clock in milliseconds, asked once a call and only when something needs it:
-- asking costs as much as a reservation's commands, and a batch of releases alone never
-- needs it.
local now
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
-- Formatting a number costs more than most commands, so each is formatted once.
local function int(x) return string.format('%d', x) end
local function tokens_of(entry) return string.match(entry, '^%d+') end
local function sum_of(key) return tonumber(redis.call('HGET', key, '=sum')) or 0 end
-- A deadline `now + ttl` formatted: alone, after a lease's tokens, and the key's expiry
-- `ttl` after it (`=exp`, and `life` from now).
local dated, digits, stamp, expiry, life = nil, nil, nil, nil, nil
local function date(deadline, ttl)
  if deadline ~= dated then
    dated, digits = deadline, int(deadline)
    stamp, expiry, life = ':' .. digits, int(deadline + ttl), int(2 * ttl)
  end
end
-- Drops the expired leases and counts the rest again. Returns the tokens in flight and
-- the earliest deadline left, nil when no lease is left (the key is then deleted).
local function sweep(key)
  local all = redis.call('HGETALL', key)
  local held, min, gone, time = 0, nil, {}, clock()
  for i = 1, #all, 2 do
    local lease, entry = all[i], all[i + 1]
    if string.byte(lease, 1) ~= 61 then
      local colon = string.find(entry, ':', 1, true)
      local deadline = colon and tonumber(string.sub(entry, colon + 1)) or 0
      if deadline <= time then
        gone[#gone + 1] = lease
      else
        held = held + tonumber(string.sub(entry, 1, colon - 1))
        if not min or deadline < min then min = deadline end
      end
    end
  end
  if not min then
    redis.call('DEL', key)
    return 0, nil
  end
  for i = 1, #gone, 1000 do
    redis.call('HDEL', key, unpack(gone, i, math.min(i + 999, #gone)))
  end
  redis.call('HSET', key, '=sum', int(held), '=min', int(min))
  return held, min
end
-- Writes `fields` (pairs of lease and entry, then `=sum`), whose latest deadline is
-- `deadline`, keeping `=min` no later than it and the key alive past it. `exp` and `min`
-- are the hash's (nil when missing).
local function write(key, fields, deadline, ttl, exp, min)
  date(deadline, ttl)
  if not min or deadline < min then
    fields[#fields + 1] = '=min'
    fields[#fields + 1] = digits
  end
  local push = not exp or exp < deadline
  if push then
    fields[#fields + 1] = '=exp'
    fields[#fields + 1] = expiry
  end
  redis.call('HSET', key, unpack(fields))
  if push then redis.call('PEXPIRE', key, life) end
end
-- Sets lease `lease` to `tokens` (digits) with its deadline `ttl` from now, the tenant
-- then holding `held`.
local function put(key, lease, tokens, held, ttl, exp, min)
  local deadline = clock() + ttl
  date(deadline, ttl)
  local entry = tokens .. stamp
  if exp and exp >= deadline and min and min <= deadline then
    redis.call('HSET', key, lease, entry, '=sum', int(held))
  else
    write(key, {lease, entry, '=sum', int(held)}, deadline, ttl, exp, min)
  end
end
-- Reserves `tokens` (digits) for `lease` under `cap`. Returns the status (1 admitted, or
-- already held: a retry of the same lease id admits once and pushes its deadline; 0 over
-- the cap; -1 larger than the cap) and the tokens in flight.
local function reserve(key, lease, tokens, cap, ttl)
  local want = tonumber(tokens)
  local found = redis.call('HMGET', key, '=sum', lease, '=exp', '=min')
  local held, exp, min = tonumber(found[1]) or 0, tonumber(found[3]), tonumber(found[4])
  if found[2] then
    put(key, lease, tokens_of(found[2]), held, ttl, exp, min)
    return 1, held
  end
  if want > cap then return -1, held end
  if held + want > cap and min and min <= clock() then
    held, min = sweep(key)
    if not min then exp = nil end
  end
  if held + want > cap then return 0, held end
  held = held + want
  put(key, lease, tokens, held, ttl, exp, min)
  return 1, held
end
-- Releases `lease`. Returns 1 if it was there (releasing is idempotent), and the tokens in
-- flight after it. A lease of 0 tokens leaves the sum as it is (Redis refuses `-0` as an
-- increment).
local function release(key, lease)
  local entry = redis.call('HGET', key, lease)
  if not entry then return 0, sum_of(key) end
  redis.call('HDEL', key, lease)
  local tokens = tokens_of(entry)
  if tokens == '0' then return 1, sum_of(key) end
  return 1, redis.call('HINCRBY', key, '=sum', '-' .. tokens)
end
-- Reads the `=` fields and `lease` (optional), sweeping first once `=min` has passed.
-- Returns the tokens in flight, the lease's entry, `=exp` and `=min`.
local function look(key, lease)
  local fields = {'=sum', '=exp', '=min', lease}
  local found = redis.call('HMGET', key, unpack(fields))
  local min = tonumber(found[3])
  if min and min <= clock() then
    sweep(key)
    found = redis.call('HMGET', key, unpack(fields))
  end
  return tonumber(found[1]) or 0, found[4], tonumber(found[2]), tonumber(found[3])
end

";

/// `ARGV`: lease, tokens, cap (empty: unchecked growth), ttl, the tokens the lease holds
/// now. Returns `{status, in_flight, registered_again}`: status 1 set, 0 growth over the
/// cap (the tokens unchanged); `registered_again` 1 when the lease had been lost and was
/// registered again with the tokens it holds now first.
const RESIZE: &str = r"
local key, lease, tokens, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[4])
local cap = tonumber(ARGV[3])
local held, entry, exp, min = look(key, lease)
local old, again = ARGV[5], 0
if entry then
  old = tokens_of(entry)
else
  -- Redis lost the lease (a restart without persistence, a flush, a failover to a
  -- lagging replica, or an expiry while this replica was cut off), but the work is
  -- running: it is registered again with the tokens it holds, whatever the cap.
  put(key, lease, old, held + tonumber(old), ttl, exp, min)
  held, entry, exp, min = look(key, lease)
  again = 1
end
local grow = tonumber(tokens) - tonumber(old)
if cap and grow > 0 and held + grow > cap then return {0, held, again} end
held = held + grow
put(key, lease, tokens, held, ttl, exp, min)
return {1, held, again}
";

/// `ARGV`: ttl, then pairs of lease id and the tokens it holds. Pushes the deadline of each
/// lease; one Redis no longer has (expired, or lost with the server's data) is registered
/// again with its tokens, whatever the cap. Returns `{in_flight, {ids registered again}}`.
const RENEW: &str = r"
local key, ttl = KEYS[1], tonumber(ARGV[1])
local held, _, exp, min = look(key, nil)
local leases = {}
for i = 2, #ARGV, 2 do leases[#leases + 1] = ARGV[i] end
if #leases == 0 then return {held, {}} end
local entries = redis.call('HMGET', key, unpack(leases))
local fields, again = {}, {}
for i, lease in ipairs(leases) do
  local tokens = entries[i] and tokens_of(entries[i])
  if not tokens then
    tokens = ARGV[2 * i + 1]
    held = held + tonumber(tokens)
    again[#again + 1] = lease
  end
  fields[#fields + 1] = lease
  date(clock() + ttl, ttl)
  fields[#fields + 1] = tokens .. stamp
end
fields[#fields + 1] = '=sum'
fields[#fields + 1] = int(held)
write(key, fields, clock() + ttl, ttl, exp, min)
return {held, again}
";

/// Reservations and releases in one call, each on its own tenant's hash: `KEYS` are the
/// hashes, one an operation, and `ARGV` the ttl, then for each operation `r` (reserve),
/// the lease, its tokens and the cap, or `x` (release) and the lease. Returns two numbers
/// an operation, in order: for a reservation its status and the tenant's tokens in flight
/// (see `reserve`), for a release 1 if the lease was there and the tokens in flight after
/// it.
const BATCH: &str = r"
local ttl = tonumber(ARGV[1])
local out, a = {}, 2
for op = 1, #KEYS do
  local status, held
  if ARGV[a] == 'r' then
    status, held = reserve(KEYS[op], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), ttl)
    a = a + 4
  else
    status, held = release(KEYS[op], ARGV[a + 1])
    a = a + 2
  end
  out[#out + 1] = status
  out[#out + 1] = held
end
return out
";

/// No `ARGV`. Returns the tokens in flight, after the sweep.
const STATE: &str = r"
return (look(KEYS[1], nil))
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
        let script = |body: &str| Script::new(&format!("{CORE}{body}"));
        Self {
            batch: script(BATCH),
            resize: script(RESIZE),
            renew: script(RENEW),
            state: script(STATE),
        }
    }
}
