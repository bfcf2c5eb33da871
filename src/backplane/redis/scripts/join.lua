purge(KEYS[3], KEYS[4], KEYS[5])
local max = tonumber(ARGV[12])
if max > 0 and redis.call('HEXISTS', KEYS[4], ARGV[3]) == 0 then
  local users = redis.call('HLEN', KEYS[4])
  if users >= max then return {'!full', users} end
end
local epoch = ensure_room(KEYS[1], ARGV[1])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local before = set_member(KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5])
local count = redis.call('HLEN', KEYS[4])
if before == 0 and ARGV[13] == '1' then
  redis.call('PUBLISH', ARGV[7], 'e' .. #ARGV[3] .. ':' .. ARGV[3] ..
    '{"type":"user_joined","payload":{"room":' .. ARGV[8] .. ',"user":' .. ARGV[5] ..
    ',"count":' .. count .. '}}')
end
redis.call('PUBLISH', ARGV[7], ARGV[9])
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
local len = redis.call('LLEN', KEYS[2])
local out = {epoch, seq, count, len, before}
if ARGV[10] ~= '' and (ARGV[11] == '' or ARGV[11] == epoch) then
  append_history_after(out, KEYS[2], tonumber(ARGV[10]), seq)
end
return out
