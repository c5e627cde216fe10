-- ARGV: prefix, request id, then per task: id, route, priority, delay, max_attempts, timeout, args,
-- tags JSON, retry_of, idempotency key, args hash, expires in, deadline in ('' where not given).
local req, seen, fresh, taken = ARGV[2], {}, 0, nil
for i = 3, #ARGV, 13 do
  local id = ARGV[i]
  local h = redis.call('HMGET', tkey(id), 'created_at', 'enqueued_by')
  if seen[id] or (h[1] and h[2] ~= req) then return redis.error_reply('DUPLICATE ' .. id) end
  seen[id] = true
  if h[1] then taken = id else fresh = fresh + 1 end
end
-- All stored by this very request: a re-send of a call whose reply was lost, so it succeeded.
if fresh == 0 then return 0 end
if taken then return redis.error_reply('DUPLICATE ' .. taken) end
for i = 3, #ARGV, 13 do
  local id, route = ARGV[i], ARGV[i + 1]
  hset(id, 'route', route, 'status', 'pending', 'priority', ARGV[i + 2], 'run_at', stamp(now + tonumber(ARGV[i + 3])),
    'created_at', NOW, 'attempts', 0, 'max_attempts', ARGV[i + 4], 'args', ARGV[i + 6], 'enqueued_by', req,
    'args_hash', ARGV[i + 10], 'last_event', 1)
  if ARGV[i + 5] ~= '' then hset(id, 'timeout', ARGV[i + 5]) end
  for k, name in ipairs({'tags', 'retry_of', 'idempotency_key'}) do
    if ARGV[i + 6 + k] ~= '' then hset(id, name, ARGV[i + 6 + k]) end
  end
  if ARGV[i + 11] ~= '' then hset(id, 'expires_at', stamp(now + tonumber(ARGV[i + 11]))) end
  if ARGV[i + 12] ~= '' then hset(id, 'deadline', stamp(now + tonumber(ARGV[i + 12]))) end
  redis.call('SADD', P .. ':routes', route)
  -- The listing indexes: ids are time-ordered, so equal scores and lex order list by age.
  redis.call('ZADD', P .. ':all', 0, id)
  redis.call('ZADD', rkey('ix', route), 0, id)
  redis.call('SADD', P .. ':ixroutes', route)
  queue(id, route)
end
publish_wakes()
return fresh
