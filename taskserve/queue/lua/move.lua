-- The state machine's one write (lifecycle.py): per task, the first move whose guards hold.
-- ARGV: prefix, retention_ms, then per task: id, result ('' for none), its moves as JSON, each
-- {to, held = {statuses}, token?, lapsed?, left?, reason?, delay?, give?, etype?, emsg?, etb?, etext?,
-- result?, ctype?, age?, batch?, stamp?, tell?} (RedisQueue._move_args). Returns 1 per task where
-- a move applied, or where an earlier send of the same move did (its stamp is on the task), else 0.
local retention, out = ARGV[2], {}
local function holds(m, h)
  local found = false
  for _, status in ipairs(m.held) do if status == h[1] then found = true end end
  if not found then return false end
  if m.token and m.token ~= h[2] then return false end
  if m.lapsed and not (h[7] and tonumber(h[7]) < now) then return false end
  if m.left and tonumber(h[5]) >= tonumber(h[6]) then return false end
  return true
end
local function apply(id, m, h, result)
  local route = h[3]
  if h[1] == 'pending' then
    redis.call('ZREM', rkey('ready', route), member(id, h[9]))
    redis.call('ZREM', rkey('delayed', route), id)
  else
    drop_lease(id, route, h[4])
    if m.tell then redis.call('PUBLISH', P .. ':cancel', id) end
  end
  if m.stamp then hset(id, 'moved_by', m.stamp) end
  -- The start travels as an age by the worker's clock, turned into a time by Redis's.
  if m.age then hset(id, 'started_at', stamp(now - tonumber(m.age))) end
  if m.batch then hset(id, 'batch_size', m.batch) end
  if m.etype then
    if m.etext then hset(id, 'error', m.etext) else hdel(id, 'error') end
    add_error(id, h[5], m.etype, m.emsg or '', m.etb)
  end
  if m.to == 'success' then
    if m.result then hset(id, 'result', result, 'content_type', m.ctype or '') end
    hdel(id, 'error')
  end
  if m.to == 'pending' then
    if m.give then
      redis.call('HINCRBY', tkey(id), 'attempts', -1)
      hdel(id, 'started_at')
    end
    if m.delay then hset(id, 'run_at', stamp(now + tonumber(m.delay))) end
    if h[1] == 'in_progress' then status_event(id, 'in_progress', nil, h[10] or NOW) end
    status_event(id, 'pending', m.reason)
    hset(id, 'status', 'pending')
    hdel(id, 'token', 'lease', 'worker')
    queue(id, route)
  else
    terminal(id, route, m.to, retention)
  end
end
for i = 3, #ARGV, 3 do
  local id, result, moves = ARGV[i], ARGV[i + 1], cjson.decode(ARGV[i + 2])
  local h = redis.call('HMGET', tkey(id),
    'status', 'token', 'route', 'worker', 'attempts', 'max_attempts', 'lease', 'moved_by', 'run_at', 'started_at')
  local applied = 0
  if h[1] then
    for _, m in ipairs(moves) do
      if holds(m, h) then
        apply(id, m, h, result)
        applied = 1
        break
      end
    end
    if applied == 0 then
      for _, m in ipairs(moves) do if m.stamp and m.stamp == h[8] then applied = 1 end end
    end
  end
  table.insert(out, applied)
end
publish_wakes()
return out
