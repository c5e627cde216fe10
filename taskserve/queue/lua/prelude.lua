-- Prepended to every script. ARGV[1] is always the key prefix.
-- Every timestamp a script writes or compares comes from Redis's own clock (TIME), never
-- from the calling host's: one host with a fast clock must not re-queue the tasks other
-- hosts hold. Redis 5+ replicates a script's effects, so TIME is allowed before writes.
local P = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function stamp(ts) return string.format('%.6f', ts) end
local NOW = stamp(now)
local function tkey(id) return P .. ':t:' .. id end
local function rkey(kind, route) return P .. ':' .. kind .. ':' .. route end
local function hset(id, ...) redis.call('HSET', tkey(id), ...) end
local function hdel(id, ...) redis.call('HDEL', tkey(id), ...) end
local function member(id, run_at) return string.format('%017.6f|', tonumber(run_at)) .. id end
local wake = {}
-- Put a pending task where claim looks for it: ready if due, else delayed. A task with a TTL
-- or a deadline is (also) in P:timers, scored by the earlier of the two, for overdue.lua.
-- A TTL bounds the wait before a task first starts; once it ran (a retry, a lost worker) only
-- its deadline still applies.
local function queue(id, route)
  local h = redis.call('HMGET', tkey(id), 'run_at', 'priority', 'expires_at', 'deadline', 'attempts')
  if tonumber(h[1]) > now then
    redis.call('ZADD', rkey('delayed', route), h[1], id)
  else
    redis.call('ZADD', rkey('ready', route), 0 - tonumber(h[2]), member(id, h[1]))
  end
  local ttl = tonumber(h[5] or '0') == 0 and h[3] or nil
  if ttl or h[4] then
    redis.call('ZADD', P .. ':timers', math.min(tonumber(ttl or h[4]), tonumber(h[4] or ttl)), id)
  end
  wake[route] = true
end
-- A task past its TTL (pending, never started) or its deadline is not started; overdue.lua ends it.
local function overdue(status, expires_at, deadline, attempts)
  if deadline and tonumber(deadline) <= now then return 'deadline' end
  if status == 'pending' and expires_at and tonumber(expires_at) <= now and tonumber(attempts or '0') == 0 then
    return 'ttl'
  end
  return nil
end
local function publish_wakes()
  for route in pairs(wake) do redis.call('PUBLISH', rkey('work', route), '') end
end
local function drop_lease(id, route, worker)
  redis.call('ZREM', rkey('leases', route), id)
  if worker then redis.call('SREM', P .. ':w:' .. worker, id) end
end
-- Append to the task's event log (stream P:e:ID): only what the hash cannot tell, an attempt
-- that went back to pending (lifecycle.history derives the rest). Ids are 0-N, N counted in the
-- hash ('last_event', 1 for the submit), so they match the ids the derived events had.
local function status_event(id, status, reason, at)
  local seq = redis.call('HINCRBY', tkey(id), 'last_event', 1)
  -- Event 1 is always the submit; a task stored before the event log had none, so skip its number.
  if seq == 1 then seq = redis.call('HINCRBY', tkey(id), 'last_event', 1) end
  local data = reason and cjson.encode({status = status, reason = reason}) or ('{"status":"' .. status .. '"}')
  redis.call('XADD', P .. ':e:' .. id, '0-' .. seq, 'k', 'status', 'd', data, 'at', at or NOW)
end
-- One failed attempt, appended to the JSON list in the hash's 'errors' field.
local function add_error(id, attempt, kind, message, traceback)
  local entry = cjson.encode({attempt = tonumber(attempt), type = kind, message = message, at = now, traceback = traceback})
  local errors = redis.call('HGET', tkey(id), 'errors')
  hset(id, 'errors', errors and (string.sub(errors, 1, -2) .. ',' .. entry .. ']') or ('[' .. entry .. ']'))
end
-- The one way a task ends: its state, its expiry, the finished counter, the wake-up.
local function terminal(id, route, status, retention)
  hset(id, 'status', status, 'completed_at', NOW, 'purge_at', stamp(now + tonumber(retention) / 1000))
  hdel(id, 'token', 'lease')
  redis.call('PEXPIRE', tkey(id), retention)
  redis.call('PEXPIRE', P .. ':e:' .. id, retention)
  redis.call('PEXPIRE', P .. ':o:' .. id, retention)
  local extra = redis.call('HMGET', tkey(id), 'idempotency_key', 'webhook', 'expires_at', 'deadline')
  -- An idempotency key lives as long as its task; a time limit has nothing left to stop.
  if extra[1] then redis.call('PEXPIRE', P .. ':idem:' .. route .. ':' .. extra[1], retention) end
  if extra[3] or extra[4] then redis.call('ZREM', P .. ':timers', id) end
  -- The task is the webhook's outbox: its delivery is due from this very write (webhooks.lua).
  if extra[2] then redis.call('ZADD', P .. ':webhooks', now, id) end
  redis.call('HINCRBY', P .. ':finished', status .. ':' .. route, 1)
  redis.call('PUBLISH', P .. ':done', id)
end
