-- ARGV: prefix, task id, token, progress JSON ('' for none), preview bytes ('' for none), its
-- content type, then per output item: its number, its JSON. Applied only while the claim holds
-- the task (fenced like an outcome). Items go to the hash P:o:ID, number -> "TIME JSON", with
-- 'n' the highest number stored. Returns 1 if applied, else 0.
local id, token = ARGV[2], ARGV[3]
local h = redis.call('HMGET', tkey(id), 'status', 'token')
if h[1] ~= 'in_progress' or h[2] ~= token then return 0 end
if ARGV[4] ~= '' then hset(id, 'progress', ARGV[4]) end
if ARGV[5] ~= '' then hset(id, 'preview', ARGV[5], 'preview_type', ARGV[6]) end
if #ARGV > 6 then
  local okey, top = P .. ':o:' .. id, 0
  for i = 7, #ARGV, 2 do
    redis.call('HSET', okey, ARGV[i], NOW .. ' ' .. ARGV[i + 1])
    top = math.max(top, tonumber(ARGV[i]))
  end
  local n = tonumber(redis.call('HGET', okey, 'n') or '0')
  if top > n then redis.call('HSET', okey, 'n', top) end
end
return 1
