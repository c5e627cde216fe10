-- ARGV: prefix, retention_ms, request id, task id, record fields... Returns the record, or nil if already terminal.
local req, id = ARGV[3], ARGV[4]
local h = redis.call('HMGET', tkey(id), 'status', 'route', 'worker', 'run_at', 'cancelled_by')
if h[1] == 'pending' then
  redis.call('ZREM', rkey('ready', h[2]), member(id, h[4]))
  redis.call('ZREM', rkey('delayed', h[2]), id)
elseif h[1] == 'in_progress' then
  drop_lease(id, h[2], h[3])
  redis.call('PUBLISH', P .. ':cancel', id)
elseif h[1] == 'cancelled' and h[5] == req then
  -- A re-send after a lost reply: this very request cancelled it.
  return redis.call('HMGET', tkey(id), unpack(ARGV, 5))
else
  return false
end
hset(id, 'cancelled_by', req)
terminal(id, h[2], 'cancelled', ARGV[2])
return redis.call('HMGET', tkey(id), unpack(ARGV, 5))
