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
