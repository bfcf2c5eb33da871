-- One room: {epoch, seq, connections, users, (user, connections, user JSON)
-- for each user on live nodes..., held message texts oldest first...}; {}
-- when the room is not known (never used, or its keys expired).
purge(KEYS[3], KEYS[4], KEYS[5])
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not state[1] then return {} end
local connections = 0
for _, n in ipairs(redis.call('HVALS', KEYS[5])) do connections = connections + tonumber(n) end
local users, order = {}, {}
local flat = redis.call('HGETALL', KEYS[3])
for i = 1, #flat, 2 do
  local field = flat[i]
  local user = string.sub(field, string.find(field, '|', 1, true) + 1)
  local value = flat[i + 1]
  local bar = string.find(value, '|', 1, true)
  local n = tonumber(string.sub(value, 1, bar - 1))
  if users[user] then
    users[user][1] = users[user][1] + n
  else
    users[user] = {n, string.sub(value, bar + 1)}
    order[#order + 1] = user
  end
end
local out = {state[1], tonumber(state[2] or '0'), connections, #order}
for _, user in ipairs(order) do
  out[#out + 1] = user
  out[#out + 1] = users[user][1]
  out[#out + 1] = users[user][2]
end
for _, frame in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do out[#out + 1] = frame end
return out
