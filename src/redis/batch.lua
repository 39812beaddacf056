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
