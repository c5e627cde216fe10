-- ARGV: prefix, task id. How many tasks of its route a pending task has ahead of it: its rank in
-- the ready set (claim order), or, while delayed, every ready task and the delayed ones due sooner.
local id = ARGV[2]
local h = redis.call('HMGET', tkey(id), 'status', 'route', 'run_at')
if h[1] ~= 'pending' then return -1 end
local rank = redis.call('ZRANK', rkey('ready', h[2]), member(id, h[3]))
if rank then return rank end
return redis.call('ZCARD', rkey('ready', h[2])) + redis.call('ZCOUNT', rkey('delayed', h[2]), '-inf', '(' .. h[3])
