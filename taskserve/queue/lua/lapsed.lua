-- ARGV: prefix, worker ('' for none). With a worker (known dead: abandon), first lapses every
-- lease it holds and forgets it. Returns the running tasks whose lease ran out (at most 1000
-- per route), for the lifecycle's 'lost' moves; lease entries of tasks no longer running go.
local worker, out = ARGV[2], {}
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
    local h = redis.call('HMGET', tkey(id), 'status', 'worker')
    if h[1] == 'in_progress' then table.insert(out, id) else drop_lease(id, route, h[2]) end
  end
end
return out
