-- ARGV: prefix, worker id, ttl seconds, WorkerInfo JSON. Stored as "LAST_SEEN JSON", stamped by Redis.
redis.call('HSET', P .. ':workers', ARGV[2], NOW .. ' ' .. ARGV[4])
redis.call('ZADD', P .. ':workers:ttl', stamp(now + tonumber(ARGV[3])), ARGV[2])
return 1
