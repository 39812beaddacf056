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
