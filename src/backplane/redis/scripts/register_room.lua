purge(KEYS[3], KEYS[4], KEYS[5])
local epoch = ensure_room(KEYS[1], ARGV[1])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
for i = 6, #ARGV, 3 do
  set_member(KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2])
end
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
local out = {epoch, seq, redis.call('HLEN', KEYS[4])}
if ARGV[4] ~= '' then
  local since = 0
  if ARGV[4] == epoch then since = tonumber(ARGV[5]) end
  if since < seq then
    local len = redis.call('LLEN', KEYS[2])
    local start = since - seq + len
    if start < 0 then start = 0 end
    for _, frame in ipairs(redis.call('LRANGE', KEYS[2], start, -1)) do out[#out + 1] = frame end
  end
end
return out
