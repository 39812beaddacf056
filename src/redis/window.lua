-- Windows over time: one hash a tenant and window (under the tenant's hash tag, beside its
-- leases), `l` the units left (below zero when responses outgrew their charges) and `t`
-- when `l` was last brought up to date, in milliseconds of Redis's clock. A bucket refills
-- at `limit` per `period` milliseconds up to `limit`; a missing key is a full bucket, so
-- the key expires when the bucket would be full again.
--
-- The level of bucket `key` now.
local function level_of(key, limit, period)
  local found = redis.call('HMGET', key, 'l', 't')
  if not found[1] then return limit end
  local level = tonumber(found[1]) + (clock() - tonumber(found[2])) * limit / period
  if level > limit then level = limit end
  return level
end
-- Keeps `level` for bucket `key`.
local function keep(key, level, limit, period)
  -- Full, or a limit of nothing (which refuses everything, whatever is owed).
  if level >= limit or limit <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'l', string.format('%.17g', level), 't', int(clock()))
  redis.call('PEXPIRE', key, math.ceil((limit - level) * period / limit) + 1)
end
-- What the `n` buckets whose keys start at `KEYS[k]` (their figures at `ARGV[a]`, as for
-- `charge`) hold now, appended to `out`, at least 0 each.
local function levels_to(out, k, a, n)
  for w = 0, n - 1 do
    local at = a + 4 * w
    local level = level_of(KEYS[k + w], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]))
    if level < 0 then level = 0 end
    out[#out + 1] = math.floor(level)
  end
end
-- Charges the `n` windows whose keys start at `KEYS[k]` and whose figures (units, limit,
-- period, forced) start at `ARGV[a]`, all or none. Returns 0, or the window (from 1) to
-- report (a window the request can never fit first, then the longest wait) and what its
-- bucket holds.
local function charge(k, a, n)
  local levels, worst, wait = {}, 0, -1
  for w = 0, n - 1 do
    local at = a + 4 * w
    local units, limit, period = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
    local level = level_of(KEYS[k + w], limit, period)
    levels[w] = level
    if ARGV[at + 3] ~= '1' then
      local this = -1
      if units > limit then
        this = math.huge
      elseif level < units then
        this = (units - level) * period / limit
      end
      if this > wait then worst, wait = w + 1, this end
    end
  end
  if worst > 0 then
    local level = levels[worst - 1]
    if level < 0 then level = 0 end
    return worst, math.floor(level)
  end
  for w = 0, n - 1 do
    local at = a + 4 * w
    local limit, period = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
    keep(KEYS[k + w], levels[w] - tonumber(ARGV[at]), limit, period)
  end
  return 0, 0
end
-- Charges `units` more to bucket `key` (gives back `-units`, up to the limit), unchecked.
local function adjust(key, units, limit, period)
  local level = level_of(key, limit, period) - units
  if level > limit then level = limit end
  keep(key, level, limit, period)
end
