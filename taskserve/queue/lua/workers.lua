-- ARGV: prefix. Forgets workers whose heartbeat ttl passed; returns id, "LAST_SEEN JSON" pairs of the rest.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':workers:ttl', '-inf', NOW)) do
  redis.call('HDEL', P .. ':workers', id)
  redis.call('ZREM', P .. ':workers:ttl', id)
end
return redis.call('HGETALL', P .. ':workers')
