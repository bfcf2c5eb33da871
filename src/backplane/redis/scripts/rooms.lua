-- Rooms with members on live nodes whose name starts with ARGV[1], by name,
-- at most ARGV[2] of them: {name, count, connections, epoch, seq, ...}.
-- A name in rc:rooms whose users all left or sat on dead nodes is removed
-- on the way (the set is only added to by set_member).
local min, max = '-', '+'
if ARGV[1] ~= '' then
  min = '[' .. ARGV[1]
  max = '[' .. ARGV[1] .. '\255'
end
local want = tonumber(ARGV[2])
local out, found = {}, 0
while found < want do
  local names = redis.call('ZRANGEBYLEX', 'rc:rooms', min, max, 'LIMIT', 0, 100)
  if #names == 0 then break end
  for _, name in ipairs(names) do
    local base = 'rc:room/' .. name
    purge(base .. '/p', base .. '/u', base .. '/c')
    local count = redis.call('HLEN', base .. '/u')
    if count == 0 then
      redis.call('ZREM', 'rc:rooms', name)
    elseif found < want then
      local connections = 0
      for _, n in ipairs(redis.call('HVALS', base .. '/c')) do
        connections = connections + tonumber(n)
      end
      local state = redis.call('HMGET', base, 'epoch', 'seq')
      out[#out + 1] = name
      out[#out + 1] = count
      out[#out + 1] = connections
      out[#out + 1] = state[1] or ''
      out[#out + 1] = tonumber(state[2] or '0')
      found = found + 1
    end
    min = '(' .. name
  end
end
return out
