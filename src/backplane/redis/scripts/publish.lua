ensure_room(KEYS[1], ARGV[1])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local frame = ARGV[5] .. seq .. ARGV[6]
local keep = tonumber(ARGV[2])
if keep > 0 then
  redis.call('RPUSH', KEYS[2], frame)
  redis.call('LTRIM', KEYS[2], -keep, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], 'm' .. seq .. ':' .. frame)
local cache, delivered = {}, 0
local flat = redis.call('HGETALL', KEYS[3])
for i = 1, #flat, 2 do
  if alive(cache, flat[i]) then delivered = delivered + tonumber(flat[i + 1]) end
end
return {seq, delivered}
