-- Webhook deliveries; P:webhooks holds the ids of tasks whose delivery is pending, scored by
-- when it is due (terminal() adds them). The hash holds webhook_state (absent while pending,
-- then delivered or failed), webhook_attempts and webhook_error.
-- ARGV: prefix, 'take', limit, lease seconds, tries: takes the due deliveries for the lease and
--   returns id, attempt per delivery taken; one whose tries ran out with its sender fails.
-- ARGV: prefix, 'settle', id, attempt, error ('' for delivered), retry in seconds ('' for never):
--   records one try if it is still the delivery's latest; returns 1, else 0.
local W = P .. ':webhooks'
if ARGV[2] == 'take' then
  local limit, lease, tries, out = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', W, '-inf', NOW, 'LIMIT', 0, limit)) do
    local h = redis.call('HMGET', tkey(id), 'webhook', 'webhook_state', 'webhook_attempts', 'webhook_error')
    if not h[1] or h[2] then
      redis.call('ZREM', W, id)  -- purged, or settled already
    elseif tonumber(h[3] or 0) >= tries then
      hset(id, 'webhook_state', 'failed', 'webhook_error', h[4] or 'its sender stopped before it had an answer')
      redis.call('ZREM', W, id)
    else
      table.insert(out, id)
      table.insert(out, redis.call('HINCRBY', tkey(id), 'webhook_attempts', 1))
      redis.call('ZADD', W, now + lease, id)
    end
  end
  return out
end
local id, attempt, err, retry_in = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local h = redis.call('HMGET', tkey(id), 'webhook', 'webhook_state', 'webhook_attempts')
if not h[1] or h[2] or tonumber(h[3] or 0) ~= attempt then return 0 end
if err == '' then
  hset(id, 'webhook_state', 'delivered')
  redis.call('ZREM', W, id)
elseif retry_in ~= '' then
  hset(id, 'webhook_error', err)
  redis.call('ZADD', W, now + tonumber(retry_in), id)
else
  hset(id, 'webhook_state', 'failed', 'webhook_error', err)
  redis.call('ZREM', W, id)
end
return 1
