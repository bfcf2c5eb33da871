purge(KEYS[1], KEYS[2], KEYS[3])
local before = set_member(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4])
local gone = 0
if before > 0 and redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  gone = 1
  if ARGV[8] == '1' then
    redis.call('PUBLISH', ARGV[6], 'e0:{"type":"user_left","payload":{"room":' .. ARGV[7] ..
      ',"user":' .. ARGV[4] .. ',"count":' .. redis.call('HLEN', KEYS[2]) .. '}}')
  end
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
return {gone, redis.call('HLEN', KEYS[2])}
