-- The fair queue of one budget in Redis: the order of `src/admit/queue.rs` ("The fair
-- order", rules 1 to 6), kept across replicas. The keys are described in
-- `src/redis/queue.rs`. Loaded after the lease helpers of `scripts.rs` (`KEYS[1]` the
-- budget's leases); each script is this file followed by a call of one of the entry
-- points at its end.
--
-- `KEYS[2]` the tickets, `KEYS[3]` their deadlines, `KEYS[4]` the counters, `KEYS[5..7]`
-- the turn of each class (sheddable, standard, critical).

local TK, DL, VTC = KEYS[2], KEYS[3], KEYS[4]
local function turn_key(c) return KEYS[5 + c] end
local function num(x) return string.format('%.17g', x) end
local function counter(tenant) return tonumber(redis.call('HGET', VTC, 't:' .. tenant)) or 0 end

-- A tenant's member in a turn set: its place (rule 3), 16 hex digits, then its name, so
-- that among equal counters the set orders by place.
local PLACE_DIGITS = 16
local function tenant_of(member) return string.sub(member, PLACE_DIGITS + 1) end

local function drop_ticket(id)
  local info = redis.call('HGET', TK, id)
  if not info then return false end
  redis.call('HDEL', TK, id)
  redis.call('ZREM', DL, id)
  if redis.call('HINCRBY', TK, '=' .. info, -1) <= 0 then
    local member = redis.call('HGET', TK, '=p' .. info)
    redis.call('HDEL', TK, '=' .. info, '=p' .. info)
    if member then redis.call('ZREM', turn_key(tonumber(string.sub(info, 1, 1))), member) end
  end
  return true
end

local function sweep_tickets()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', DL, '-inf', clock())) do drop_ticket(id) end
end

-- The highest class with tickets (rule 1).
local function first_class()
  for c = 2, 0, -1 do
    if redis.call('ZCARD', turn_key(c)) > 0 then return c end
  end
  return nil
end

-- The tenant whose turn it is in class `c`: the least counter, then the earliest place
-- (rules 2 and 3).
local function first_tenant(c)
  local first = redis.call('ZRANGE', turn_key(c), 0, 0)[1]
  return first and tenant_of(first)
end

-- Raises the counter of a tenant back from idle (rule 6). `active`: it waits or runs on
-- the replica asking; a ticket of it on any replica makes it active too.
local function lift(tenant, active)
  if active then return end
  for c = 0, 2 do
    if redis.call('HEXISTS', TK, '=' .. c .. tenant) == 1 then return end
  end
  local least
  for c = 0, 2 do
    local first = redis.call('ZRANGE', turn_key(c), 0, 0, 'WITHSCORES')
    if first[2] and (not least or tonumber(first[2]) < least) then least = tonumber(first[2]) end
  end
  least = least or tonumber(redis.call('HGET', VTC, '=last')) or 0
  if least > counter(tenant) then redis.call('HSET', VTC, 't:' .. tenant, num(least)) end
end

-- Counts `share` admitted for `tenant`, in its counter and its place in every turn set,
-- and as the counter of the tenant admitted last.
local function served(tenant, share)
  local after = num(counter(tenant) + share)
  redis.call('HSET', VTC, 't:' .. tenant, after, '=last', after)
  local members = redis.call('HMGET', TK, '=p0' .. tenant, '=p1' .. tenant, '=p2' .. tenant)
  for c = 0, 2 do
    if members[c + 1] then redis.call('ZADD', turn_key(c), after, members[c + 1]) end
  end
end

-- A ticket of `tenant` in class `c`; its tenant's first in that class takes a place at
-- the back (rule 3), kept while any ticket of the tenant in that class waits.
local function add_ticket(id, c, tenant, ttl)
  local info = c .. tenant
  redis.call('HSET', TK, id, info)
  if redis.call('HINCRBY', TK, '=' .. info, 1) == 1 then
    local place = redis.call('HINCRBY', TK, '=n', 1)
    local member = string.format('%0' .. PLACE_DIGITS .. 'x', place) .. tenant
    redis.call('HSET', TK, '=p' .. info, member)
    redis.call('ZADD', turn_key(c), counter(tenant), member)
  end
  redis.call('ZADD', DL, clock() + ttl, id)
end

local function keep(ttl)
  if redis.call('ZCARD', DL) == 0 then
    redis.call('DEL', TK, KEYS[5], KEYS[6], KEYS[7])
  else
    for k = 2, 7 do
      if k ~= 4 then redis.call('PEXPIRE', KEYS[k], ttl) end
    end
  end
  redis.call('PEXPIRE', VTC, math.max(ttl * 20, 600000))
end

local function wake(channel)
  if redis.call('ZCARD', DL) > 0 then redis.call('PUBLISH', channel, '') end
end

-- `ARGV`: lease, tokens, cap, ttl (the budget's lease, reserved as the batch script
-- does), then ticket, tenant, class, share (tokens ÷ weight), active (`1` when the tenant
-- waits or runs on this replica), channel, pass (`1` when the next request of the tenant
-- on this replica is of the same class, so that its ticket stays for that one if this
-- request is admitted). Returns `{status, in_flight}`: 1 admitted, 4 admitted with the
-- ticket kept for the next, 0 over the cap and 2 not its turn (either way it waits with
-- the ticket), 3 shed, -1 larger than the cap.
local function admit()
  sweep_tickets()
  local ticket, tenant, class, share = ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
  local active, ttl, channel, pass = ARGV[9] == '1', tonumber(ARGV[4]), ARGV[10], ARGV[11] == '1'
  local holding = redis.call('HGET', TK, ticket)
  local function queue(status)
    if not holding then
      lift(tenant, active)
      add_ticket(ticket, class, tenant, ttl)
    end
    keep(ttl)
    return {status, sum_of(KEYS[1])}
  end
  local top = first_class()
  if holding then
    if top ~= class or first_tenant(class) ~= tenant then return queue(2) end
  elseif top and class == 0 then
    keep(ttl)
    return {3, sum_of(KEYS[1])}
  elseif top and top >= class then
    return queue(2)
  end
  local status, held = reserve(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), ttl)
  if status == 1 then
    if not holding then
      lift(tenant, active)
    elseif pass then
      status = 4
    else
      drop_ticket(ticket)
    end
    served(tenant, share)
    wake(channel)
    keep(ttl)
    return {status, held}
  elseif status == 0 then
    return queue(0)
  end
  if holding then drop_ticket(ticket) end
  keep(ttl)
  return {status, held}
end

-- `ARGV`: ticket, ttl, channel. Removes the ticket; the others are woken, as the turn may
-- have passed. Returns 1 if it was there.
local function cancel()
  sweep_tickets()
  local dropped = drop_ticket(ARGV[1])
  if dropped then wake(ARGV[3]) end
  keep(tonumber(ARGV[2]))
  return dropped and 1 or 0
end

-- `ARGV`: ttl, then ticket ids. Pushes back the deadline of each ticket still there.
local function renew()
  sweep_tickets()
  local ttl = tonumber(ARGV[1])
  for i = 2, #ARGV do redis.call('ZADD', DL, 'XX', clock() + ttl, ARGV[i]) end
  keep(ttl)
  return 0
end
