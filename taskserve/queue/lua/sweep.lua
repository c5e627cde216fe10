-- ARGV: prefix, ids per index. Drops from the listing indexes the ids whose task hash Redis
-- has expired, walking each index oldest first from where the last sweep stopped (P:sweep).
-- Returns {ids dropped, 1 if every index was walked to its end}.
local count, dropped, all_done = tonumber(ARGV[2]), 0, 1
local keys = {P .. ':all'}
for _, route in ipairs(redis.call('SMEMBERS', P .. ':ixroutes')) do table.insert(keys, rkey('ix', route)) end
for n, key in ipairs(keys) do
  local from = redis.call('HGET', P .. ':sweep', key)
  local ids = redis.call('ZRANGEBYLEX', key, from and ('(' .. from) or '-', '+', 'LIMIT', 0, count)
  for _, id in ipairs(ids) do
    if redis.call('EXISTS', tkey(id)) == 0 then
      redis.call('ZREM', key, id)
      dropped = dropped + 1
    end
  end
  if #ids < count then
    redis.call('HDEL', P .. ':sweep', key)
    if n > 1 and redis.call('ZCARD', key) == 0 then redis.call('SREM', P .. ':ixroutes', string.sub(key, #P + 5)) end
  else
    all_done = 0
    redis.call('HSET', P .. ':sweep', key, ids[#ids])
  end
end
return {dropped, all_done}
