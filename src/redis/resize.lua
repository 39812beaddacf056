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
