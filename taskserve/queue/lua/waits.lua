-- ARGV[2]: priority levels to look at; ARGV[3..]: routes. Returns {route, seconds} per route with
-- a due task: how long its longest-waiting one has waited since it fell due. The ready set is
-- ordered by -priority, then run_at, so the first member of each level is that level's oldest;
-- a delayed task past its run_at that no claim has promoted yet waits too.
local out = {}
for i = 3, #ARGV do
  local route = ARGV[i]
  local ready = rkey('ready', route)
  local earliest = nil
  local first = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
  local levels = 0
  while first[1] and levels < tonumber(ARGV[2]) do
    local run_at = tonumber(string.sub(first[1], 1, 17))
    if not earliest or run_at < earliest then earliest = run_at end
    first = redis.call('ZRANGEBYSCORE', ready, '(' .. first[2], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    levels = levels + 1
  end
  local delayed = redis.call('ZRANGE', rkey('delayed', route), 0, 0, 'WITHSCORES')
  if delayed[1] and tonumber(delayed[2]) <= now and (not earliest or tonumber(delayed[2]) < earliest) then
    earliest = tonumber(delayed[2])
  end
  if earliest then
    table.insert(out, route)
    table.insert(out, stamp(math.max(0, now - earliest)))
  end
end
return out
