local ttl = tonumber(ARGV[1])
local out, a, k, last = {}, 2, 1, #ARGV
while a <= last do
  local op, status, held, n = ARGV[a], 1, 0, 0
  if op == 'r' or op == 'R' then
    local key, lease = KEYS[k], ARGV[a + 1]
    if op == 'R' then n = tonumber(ARGV[a + 4]) end
    -- A retry of a lease Redis holds already charged its windows the first time.
    local again = n > 0 and redis.call('HEXISTS', key, lease) == 1
    status, held = reserve(key, lease, ARGV[a + 2], tonumber(ARGV[a + 3]), ttl)
    if status == 1 and n > 0 and not again then
      local worst, level = charge(k + 1, a + 5, n)
      if worst > 0 then
        release(key, lease)
        status, held = -1 - worst, level
      end
    end
    k, a = k + 1 + n, a + 4
    if op == 'R' then a = a + 1 + 4 * n end
  elseif op == 'x' then
    status, held = release(KEYS[k], ARGV[a + 1])
    k, a = k + 1, a + 2
  else
    adjust(KEYS[k], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]))
    k, a = k + 1, a + 4
  end
  out[#out + 1] = status
  out[#out + 1] = held
  -- A reservation with windows: what each bucket holds now (after its charge).
  if op == 'R' then levels_to(out, k - n, a - 4 * n, n) end
end
return out
