-- ARGV: prefix, route ('' for all), status ('' for any), limit, before id ('' for the newest), window,
-- owner ('' for anyone's), fields... (the first two 'route' and 'status').
-- Walks the listing index (P:all, P:ix:ROUTE, or P:ox:OWNER) newest first, looking at no more than
-- `window` ids; drops ids whose task hash has expired. Returns the cursor to go on from ('' at the
-- end), then per task its id and its fields.
local route, status, limit, window, owner = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[6]), ARGV[7]
local key = route == '' and (P .. ':all') or rkey('ix', route)
-- An owner's index holds every route: the route is then a filter, as the status is.
if owner ~= '' then key = rkey('ox', owner) end
local upper = ARGV[5] == '' and '+' or ('(' .. ARGV[5])
local out, found, looked = {''}, 0, 0
while found < limit and looked < window do
  local ids = redis.call('ZREVRANGEBYLEX', key, upper, '-', 'LIMIT', 0, math.min(limit - found + 10, window - looked))
  if #ids == 0 then return out end
  for _, id in ipairs(ids) do
    looked = looked + 1
    upper = '(' .. id
    local h = redis.call('HMGET', tkey(id), unpack(ARGV, 8))
    if not h[1] then
      redis.call('ZREM', key, id)
      if key ~= P .. ':all' then redis.call('ZREM', P .. ':all', id) end
    elseif (status == '' or h[2] == status) and (owner == '' or route == '' or h[1] == route) then
      table.insert(out, id)
      for j = 1, #h do table.insert(out, h[j]) end
      found = found + 1
      if found == limit then break end
    end
  end
end
-- More pages only if an older id is left to look at.
if #redis.call('ZREVRANGEBYLEX', key, upper, '-', 'LIMIT', 0, 1) > 0 then out[1] = string.sub(upper, 2) end
return out
