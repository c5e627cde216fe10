-- ARGV: prefix, ids per index. Drops from the listing indexes the ids whose task hash Redis
-- has expired, walking each index oldest first from where the last sweep stopped (P:sweep).
-- Returns {ids dropped, 1 if every index was walked to its end}.
local count, dropped, all_done = tonumber(ARGV[2]), 0, 1
-- Each index with the set that names it (P:all is named by none).
local keys, sets, names = {P .. ':all'}, {false}, {false}
for _, route in ipairs(redis.call('SMEMBERS', P .. ':ixroutes')) do
  table.insert(keys, rkey('ix', route)); table.insert(sets, P .. ':ixroutes'); table.insert(names, route)
end
for _, owner in ipairs(redis.call('SMEMBERS', P .. ':oxowners')) do
  table.insert(keys, rkey('ox', owner)); table.insert(sets, P .. ':oxowners'); table.insert(names, owner)
end
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
    if sets[n] and redis.call('ZCARD', key) == 0 then redis.call('SREM', sets[n], names[n]) end
  else
    all_done = 0
    redis.call('HSET', P .. ':sweep', key, ids[#ids])
  end
end
return {dropped, all_done}
