-- ARGV: prefix, worker, token, limit, lease seconds, highest ready score taken ('+inf' or -min_priority),
-- concurrency caps as JSON {route: N} ('' for none), routes...
-- Returns per claim: id, route, args, attempts, max_attempts, timeout, priority, deadline, run_at, trace.
local worker, token, limit, lease, ceiling = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local caps = ARGV[7] ~= '' and cjson.decode(ARGV[7]) or {}
local lease_until = stamp(now + lease)
-- The token is new for every claim call, so it doubles as the request id: a re-send after a
-- lost reply finds what the first run took under it and answers with that (those still held).
local taken_key = P .. ':c:' .. token
local out = {}
local function row(id, route, attempts)
  local h = redis.call('HMGET', tkey(id), 'args', 'max_attempts', 'timeout', 'priority', 'deadline', 'run_at', 'trace')
  return {id, route, h[1], attempts, h[2], h[3] or '', h[4] or '0', h[5] or '', h[6] or '', h[7] or ''}
end
local taken = redis.call('GET', taken_key)
if taken then
  for id in string.gmatch(taken, '%S+') do
    local h = redis.call('HMGET', tkey(id), 'status', 'token', 'route', 'attempts')
    if h[1] == 'in_progress' and h[2] == token then table.insert(out, row(id, h[3], tonumber(h[4]))) end
  end
  return out
end
local found, ids, room = {}, {}, {}
for i = 8, #ARGV do
  local route = ARGV[i]
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', rkey('delayed', route), '-inf', NOW, 'LIMIT', 0, 500)) do
    redis.call('ZREM', rkey('delayed', route), id)
    queue(id, route)
  end
  -- A cap counts the route's live leases (a lapsed one frees its slot: its holder is dead or hung).
  room[route] = limit
  if caps[route] then room[route] = math.min(limit, caps[route] - redis.call('ZCOUNT', rkey('leases', route), NOW, '+inf')) end
  if room[route] > 0 then
    local top = redis.call('ZRANGEBYSCORE', rkey('ready', route), '-inf', ceiling, 'WITHSCORES', 'LIMIT', 0, room[route])
    for j = 1, #top, 2 do table.insert(found, {tonumber(top[j + 1]), top[j], route}) end
  end
end
-- Highest priority first, then oldest run_at (the member starts with it), across routes.
table.sort(found, function(a, b) if a[1] ~= b[1] then return a[1] < b[1] end return a[2] < b[2] end)
for k = 1, math.min(limit, #found) do
  local m, route = found[k][2], found[k][3]
  local id = string.sub(m, string.find(m, '|', 1, true) + 1)
  redis.call('ZREM', rkey('ready', route), m)
  local h = redis.call('HMGET', tkey(id), 'status', 'expires_at', 'deadline', 'attempts')
  -- Past its TTL or deadline a task stays out of the ready set: P:timers has it for overdue.lua.
  if h[1] == 'pending' and not overdue(h[1], h[2], h[3], h[4]) and room[route] > 0 then
    room[route] = room[route] - 1
    local attempts = redis.call('HINCRBY', tkey(id), 'attempts', 1)
    hset(id, 'status', 'in_progress', 'token', token, 'lease', lease_until, 'started_at', NOW, 'worker', worker)
    redis.call('ZADD', rkey('leases', route), lease_until, id)
    redis.call('SADD', P .. ':w:' .. worker, id)
    table.insert(ids, id)
    table.insert(out, row(id, route, attempts))
  end
end
-- Past the lease nothing taken here can still be held, so the record need not outlive it.
if #ids > 0 then redis.call('SET', taken_key, table.concat(ids, ' '), 'EX', math.max(1, math.ceil(lease))) end
return out
