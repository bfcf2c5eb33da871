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
  append_history_after(out, KEYS[2], since, seq)
end
return out
