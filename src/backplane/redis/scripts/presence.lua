purge(KEYS[1], KEYS[2], KEYS[3])
return redis.call('HGETALL', KEYS[1])
