-- ARGV: prefix. The tasks P:timers says may be overdue: returns id, 'ttl' or 'deadline', and the
-- moment passed, for the lifecycle's moves. Entries that can no longer fire leave the index: the
-- task ended, or has started once, so that its TTL no longer applies and only a deadline may.
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':timers', '-inf', NOW, 'LIMIT', 0, 1000)) do
  local h = redis.call('HMGET', tkey(id), 'status', 'expires_at', 'deadline', 'attempts')
  local kind = (h[1] == 'pending' or h[1] == 'in_progress') and overdue(h[1], h[2], h[3], h[4])
  if kind then
    table.insert(out, id)
    table.insert(out, kind)
    table.insert(out, kind == 'ttl' and h[2] or h[3])
  elseif (h[1] == 'in_progress' or h[1] == 'pending') and h[3] then
    redis.call('ZADD', P .. ':timers', h[3], id)
  else
    redis.call('ZREM', P .. ':timers', id)
  end
end
return out
