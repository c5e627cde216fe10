-- ARGV: prefix, request id, then per task: id, route, priority, delay, max_attempts, timeout, args,
-- tags JSON, retry_of, idempotency key, args hash, expires in, deadline in, webhook, max_queue,
-- trace context, owner ('' where not given). The idempotency key comes scoped by owner. Returns {number stored, then per task the id of the earlier task its
-- idempotency key names, or ''}; errors DUPLICATE (task id taken), CONFLICT (key used with other
-- arguments), FULL (a route holds max_queue pending tasks). Nothing is stored on an error.
-- Empty args: they were sent ahead, in chunks, to P:up:ID, and are moved into the task from there.
local W = 17
local req, seen, fresh, taken = ARGV[2], {}, 0, nil
for i = 3, #ARGV, W do
  local id = ARGV[i]
  local h = redis.call('HMGET', tkey(id), 'created_at', 'enqueued_by')
  if seen[id] or (h[1] and h[2] ~= req) then return redis.error_reply('DUPLICATE ' .. id) end
  seen[id] = true
  if h[1] then taken = id else fresh = fresh + 1 end
end
-- All stored by this very request: a re-send of a call whose reply was lost, so it succeeded.
if fresh == 0 then return {0} end
if taken then return redis.error_reply('DUPLICATE ' .. taken) end
-- Idempotency keys and queue bounds are checked for every task before any is stored.
local replays, new_per_route, limit = {}, {}, {}
for i = 3, #ARGV, W do
  local route, key = ARGV[i + 1], ARGV[i + 9]
  local earlier = ''
  if key ~= '' then
    local found = redis.call('GET', P .. ':idem:' .. route .. ':' .. key)
    if found and redis.call('EXISTS', tkey(found)) == 1 then
      if redis.call('HGET', tkey(found), 'args_hash') ~= ARGV[i + 10] then
        return redis.error_reply('CONFLICT ' .. found .. ' ' .. key)
      end
      earlier = found
    end
  end
  table.insert(replays, earlier)
  if earlier == '' then
    new_per_route[route] = (new_per_route[route] or 0) + 1
    if ARGV[i + 14] ~= '' then limit[route] = tonumber(ARGV[i + 14]) end
  end
end
for route, cap in pairs(limit) do
  local pending = redis.call('ZCARD', rkey('ready', route)) + redis.call('ZCARD', rkey('delayed', route))
  if pending + new_per_route[route] > cap then
    return redis.error_reply('FULL ' .. pending .. ' ' .. cap .. ' ' .. new_per_route[route] .. ' ' .. route)
  end
end
-- Only the tasks stored need what was staged: a replay's was deleted by the run that found it,
-- and a re-send of that run (its reply lost) must answer the replay again.
local staged, n = {}, 0
for i = 3, #ARGV, W do
  n = n + 1
  if ARGV[i + 6] == '' and replays[n] == '' then
    staged[ARGV[i]] = redis.call('GET', P .. ':up:' .. ARGV[i])
    if not staged[ARGV[i]] then return redis.error_reply('STAGED ' .. ARGV[i]) end
  end
end
for i = 3, #ARGV, W do
  if ARGV[i + 6] == '' then redis.call('DEL', P .. ':up:' .. ARGV[i]) end
end
local stored = 0
n = 0
for i = 3, #ARGV, W do
  n = n + 1
  local id, route = ARGV[i], ARGV[i + 1]
  if replays[n] == '' then
    stored = stored + 1
    hset(id, 'route', route, 'status', 'pending', 'priority', ARGV[i + 2], 'run_at', stamp(now + tonumber(ARGV[i + 3])),
      'created_at', NOW, 'attempts', 0, 'max_attempts', ARGV[i + 4], 'args', staged[id] or ARGV[i + 6], 'enqueued_by', req,
      'args_hash', ARGV[i + 10], 'last_event', 1)
    if ARGV[i + 5] ~= '' then hset(id, 'timeout', ARGV[i + 5]) end
    for k, name in ipairs({'tags', 'retry_of', 'idempotency_key'}) do
      if ARGV[i + 6 + k] ~= '' then hset(id, name, ARGV[i + 6 + k]) end
    end
    if ARGV[i + 11] ~= '' then hset(id, 'expires_at', stamp(now + tonumber(ARGV[i + 11]))) end
    if ARGV[i + 12] ~= '' then hset(id, 'deadline', stamp(now + tonumber(ARGV[i + 12]))) end
    if ARGV[i + 13] ~= '' then hset(id, 'webhook', ARGV[i + 13]) end
    if ARGV[i + 15] ~= '' then hset(id, 'trace', ARGV[i + 15]) end
    if ARGV[i + 16] ~= '' then
      -- One owner's listing index (access control): newest first, as P:all.
      hset(id, 'owner', ARGV[i + 16])
      redis.call('ZADD', rkey('ox', ARGV[i + 16]), 0, id)
      redis.call('SADD', P .. ':oxowners', ARGV[i + 16])
    end
    if ARGV[i + 9] ~= '' then redis.call('SET', P .. ':idem:' .. route .. ':' .. ARGV[i + 9], id) end
    redis.call('SADD', P .. ':routes', route)
    -- The listing indexes: ids are time-ordered, so equal scores and lex order list by age.
    redis.call('ZADD', P .. ':all', 0, id)
    redis.call('ZADD', rkey('ix', route), 0, id)
    redis.call('SADD', P .. ':ixroutes', route)
    queue(id, route)
  end
end
publish_wakes()
table.insert(replays, 1, stored)
return replays
