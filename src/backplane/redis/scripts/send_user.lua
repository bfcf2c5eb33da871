local cache, total = {}, 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  if alive(cache, flat[i]) then
    total = total + tonumber(flat[i + 1])
  else
    redis.call('HDEL', KEYS[1], flat[i])
  end
end
if total > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return total
