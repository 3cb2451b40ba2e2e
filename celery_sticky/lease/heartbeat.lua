-- Register a worker or renew its heartbeat. Costs the same whatever the
-- number of keys the worker owns: leases point at the worker, not the clock.
-- A worker that registers again (same name) is no longer "reaped" or "draining":
-- the leases nobody took over from it are valid again.
--
-- The worker's tags are kept as 'tag:<name>' fields (what the claim script
-- matches affinities against) and as their canonical text in 'tags'; every tag
-- set ever registered is remembered in '<prefix>tagsets', so a task can be told
-- that no worker ever offered what it requires.
--
-- KEYS[1] workers zset    KEYS[2] worker info hash    KEYS[3] tag sets ever registered
-- ARGV[1] node name       ARGV[2] capacity    ARGV[3] direct queue name
-- ARGV[4] '1' when (re)registering at start
-- ARGV[5] tags ('name=value,...' sorted)      ARGV[6] most keys it takes ('' for no limit)
--
-- Returns the server time, which every liveness decision is measured against.
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
local fresh = ARGV[4] == '1' or redis.call('HEXISTS', KEYS[2], 'tags') == 0
redis.call('HSET', KEYS[2], 'capacity', ARGV[2], 'queue', ARGV[3], 'heartbeat', tostring(now))
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[2], 'reaped', 'reaped_at', 'draining')
end
if fresh then
  for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
    if string.sub(field, 1, 4) == 'tag:' then
      redis.call('HDEL', KEYS[2], field)
    end
  end
  for pair in string.gmatch(ARGV[5], '[^,]+') do
    local name, value = string.match(pair, '^([^=]+)=(.*)$')
    redis.call('HSET', KEYS[2], 'tag:' .. name, value)
  end
  redis.call('HSET', KEYS[2], 'tags', ARGV[5])
  if ARGV[5] ~= '' then
    redis.call('SADD', KEYS[3], ARGV[5])
  end
  if ARGV[6] == '' then
    redis.call('HDEL', KEYS[2], 'max_keys')
  else
    redis.call('HSET', KEYS[2], 'max_keys', ARGV[6])
  end
end
return tostring(now)
