-- ARGV: prefix, retention_ms, then per outcome: id, token, kind, result, content_type, error, retry delay, started age,
-- error type, error message, batch size ('' for none).
-- kind: s = success, n = success without a result, p = hand back, f = failure (retried if retry delay ~= '').
-- started age: seconds since the call began, by the worker's clock ('' = keep the claim time).
local retention, out = ARGV[2], {}
for i = 3, #ARGV, 11 do
  local id, token, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local h = redis.call('HMGET', tkey(id), 'status', 'token', 'route', 'worker', 'attempts', 'max_attempts', 'finished_by')
  local held = h[1] == 'in_progress' and h[2] == token
  if held then
    drop_lease(id, h[3], h[4])
    hset(id, 'finished_by', token)
    if kind == 'p' then
      redis.call('HINCRBY', tkey(id), 'attempts', -1)
      hset(id, 'status', 'pending')
      hdel(id, 'token', 'lease', 'started_at', 'worker')
      status_event(id, 'pending', 'released')
      queue(id, h[3])
    else
      if ARGV[i + 7] ~= '' then hset(id, 'started_at', stamp(now - tonumber(ARGV[i + 7]))) end
      if ARGV[i + 10] ~= '' then hset(id, 'batch_size', ARGV[i + 10]) end
      if kind == 'f' then
        if ARGV[i + 5] == '' then hdel(id, 'error') else hset(id, 'error', ARGV[i + 5]) end
        add_error(id, h[5], ARGV[i + 8], ARGV[i + 9])
        if ARGV[i + 6] ~= '' and tonumber(h[5]) < tonumber(h[6]) then
          hset(id, 'status', 'pending', 'run_at', stamp(now + tonumber(ARGV[i + 6])))
          hdel(id, 'token', 'lease', 'worker')
          status_event(id, 'pending', 'retry')
          queue(id, h[3])
        else
          terminal(id, h[3], 'failure', retention)
        end
      else
        if kind == 's' then hset(id, 'result', ARGV[i + 3], 'content_type', ARGV[i + 4]) end
        hdel(id, 'error')
        terminal(id, h[3], 'success', retention)
      end
    end
  end
  -- A re-send after a lost reply finds its own outcome already applied: say so again.
  table.insert(out, (held or h[7] == token) and 1 or 0)
end
publish_wakes()
return out
