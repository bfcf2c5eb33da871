-- /api/subscribe and /api/unsubscribe (§14.3): publishes the envelope when
-- the user has a connection on a live node, and returns how many of those
-- connections it changes: for a subscribe those not in the room yet (a
-- limit may still refuse some), for an unsubscribe those in it.
local cache, total, in_room = {}, 0, 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local node = flat[i]
  if alive(cache, node) then
    total = total + tonumber(flat[i + 1])
    local entry = redis.call('HGET', KEYS[2], node .. '|' .. ARGV[3])
    if entry then in_room = in_room + count_of(entry) end
  else
    redis.call('HDEL', KEYS[1], node)
  end
end
if total > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
if ARGV[4] == '1' then
  if total > in_room then return total - in_room end
  return 0
end
return in_room
