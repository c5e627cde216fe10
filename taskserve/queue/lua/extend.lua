-- ARGV: prefix, lease seconds, then id, token pairs. Returns the ids still held. Safe to re-send.
local lease_until, out = stamp(now + tonumber(ARGV[2])), {}
for i = 3, #ARGV, 2 do
  local h = redis.call('HMGET', tkey(ARGV[i]), 'status', 'token', 'route')
  if h[1] == 'in_progress' and h[2] == ARGV[i + 1] then
    hset(ARGV[i], 'lease', lease_until)
    redis.call('ZADD', rkey('leases', h[3]), lease_until, ARGV[i])
    table.insert(out, ARGV[i])
  end
end
return out
