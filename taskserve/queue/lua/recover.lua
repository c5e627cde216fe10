-- ARGV: prefix, retention_ms, error, worker ('' for none), error type, error message. First lapses what the worker holds and
-- forgets it (abandon), then moves every lapsed lease back to pending, or to failure once out of
-- attempts. Safe to re-send: a second run finds those leases already gone.
local retention, err, worker, n = ARGV[2], ARGV[3], ARGV[4], 0
if worker ~= '' then
  local lapsed = stamp(now - 1)
  for _, id in ipairs(redis.call('SMEMBERS', P .. ':w:' .. worker)) do
    local h = redis.call('HMGET', tkey(id), 'status', 'worker', 'route')
    if h[1] == 'in_progress' and h[2] == worker then
      hset(id, 'lease', lapsed)
      redis.call('ZADD', rkey('leases', h[3]), lapsed, id)
    end
  end
  redis.call('HDEL', P .. ':workers', worker)
  redis.call('ZREM', P .. ':workers:ttl', worker)
end
for _, route in ipairs(redis.call('SMEMBERS', P .. ':routes')) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', rkey('leases', route), '-inf', '(' .. NOW, 'LIMIT', 0, 1000)) do
    local h = redis.call('HMGET', tkey(id), 'status', 'worker', 'attempts', 'max_attempts')
    drop_lease(id, route, h[2])
    if h[1] == 'in_progress' then
      n = n + 1
      hset(id, 'error', err)
      add_error(id, h[3], ARGV[5], ARGV[6])
      if tonumber(h[3]) < tonumber(h[4]) then
        hset(id, 'status', 'pending')
        hdel(id, 'token', 'lease', 'worker')
        status_event(id, 'pending', 'lost')
        queue(id, route)
      else
        terminal(id, route, 'failure', retention)
      end
    end
  end
end
publish_wakes()
return n
