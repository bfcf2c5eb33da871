local function alive(cache, node)
  local a = cache[node]
  if a == nil then
    a = redis.call('EXISTS', 'rc:node:' .. node) == 1
    cache[node] = a
  end
  return a
end
local function count_of(value)
  return tonumber(string.sub(value, 1, string.find(value, '|', 1, true) - 1))
end
-- Removes the entries of dead nodes from a room's p, u and c hashes.
local function purge(p, u, c)
  local cache, dead, any = {}, {}, false
  for _, node in ipairs(redis.call('HKEYS', c)) do
    if not alive(cache, node) then
      dead[node] = true
      any = true
      redis.call('HDEL', c, node)
    end
  end
  if not any then return end
  local flat = redis.call('HGETALL', p)
  for i = 1, #flat, 2 do
    local field = flat[i]
    local bar = string.find(field, '|', 1, true)
    if dead[string.sub(field, 1, bar - 1)] then
      local user = string.sub(field, bar + 1)
      if redis.call('HINCRBY', u, user, -count_of(flat[i + 1])) <= 0 then
        redis.call('HDEL', u, user)
      end
      redis.call('HDEL', p, field)
    end
  end
  if redis.call('EXISTS', u) == 0 then redis.call('ZREM', 'rc:rooms', string.sub(u, 9, -3)) end
end
local function ensure_room(key, fresh)
  local epoch = redis.call('HGET', key, 'epoch')
  if not epoch then
    epoch = fresh
    redis.call('HSET', key, 'epoch', epoch, 'seq', 0)
  end
  return epoch
end
-- Sets this node's connections of a user in a room; returns the user's
-- connections on every live node before.
local function set_member(p, u, c, node, user, n, user_json)
  local field = node .. '|' .. user
  local old = redis.call('HGET', p, field)
  local was = 0
  if old then was = count_of(old) end
  local before = tonumber(redis.call('HGET', u, user) or '0')
  if n > 0 then
    redis.call('HSET', p, field, n .. '|' .. user_json)
  else
    redis.call('HDEL', p, field)
  end
  local delta = n - was
  if delta ~= 0 then
    if redis.call('HINCRBY', u, user, delta) <= 0 then redis.call('HDEL', u, user) end
    if redis.call('HINCRBY', c, node, delta) <= 0 then redis.call('HDEL', c, node) end
    -- rc:rooms: the occupied rooms by name (u is rc:room/{R}/u), for /api/rooms.
    if redis.call('EXISTS', u) == 1 then
      redis.call('ZADD', 'rc:rooms', 0, string.sub(u, 9, -3))
    else
      redis.call('ZREM', 'rc:rooms', string.sub(u, 9, -3))
    end
  end
  return before
end
-- Appends to `out` the messages of the history after seq `since`; the
-- history is contiguous and ends at `seq`, so `since` maps to a list index.
local function append_history_after(out, history, since, seq)
  if since < seq then
    local start = since - seq + redis.call('LLEN', history)
    if start < 0 then start = 0 end
    for _, frame in ipairs(redis.call('LRANGE', history, start, -1)) do out[#out + 1] = frame end
  end
end
