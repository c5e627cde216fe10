-- Returns {route, pending, in_progress} per route; with 'prune', forgets routes left with no active task.
local out = {}
for _, route in ipairs(redis.call('SMEMBERS', P .. ':routes')) do
  local pending = redis.call('ZCARD', rkey('ready', route)) + redis.call('ZCARD', rkey('delayed', route))
  local running = redis.call('ZCARD', rkey('leases', route))
  if pending + running == 0 and ARGV[2] == 'prune' then redis.call('SREM', P .. ':routes', route) end
  table.insert(out, {route, pending, running})
end
return out
