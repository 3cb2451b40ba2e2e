-- Register a worker or renew its heartbeat. Costs the same whatever the
-- number of keys the worker owns: leases point at the worker, not the clock.
-- A worker that registers again (same name) is no longer "reaped" or "draining":
-- the leases nobody took over from it are valid again.
--
-- One process per node name: registration stores the process's instance token
-- ('<host>:<pid>:<random>'). A second process registering a name whose instance
-- still heartbeats is refused ('taken', unless forced: same host, old pid gone),
-- and a heartbeat from an instance that is no longer the registered one is
-- refused too ('superseded': it was dead long enough for another to take its name).
--
-- A heartbeat (not a registration) of a worker marked reaped is refused as well
-- ('reaped'): it was paused long enough for its queue to be moved on. Its score is
-- not renewed, so its keys stay free to take; it must rejoin by registering again.
--
-- The worker's tags are kept as 'tag:<name>' fields (what the claim script
-- matches affinities against) and as their canonical text in 'tags'; every tag
-- set ever registered is remembered in '<prefix>tagsets', so a task can be told
-- that no worker ever offered what it requires.
--
-- KEYS[1] workers zset    KEYS[2] worker info hash    KEYS[3] tag sets ever registered
-- KEYS[4] the store's born stamp ('<prefix>born')
-- ARGV[1] node name       ARGV[2] capacity    ARGV[3] direct queue name
-- ARGV[4] '1' when (re)registering at start
-- ARGV[5] tags ('name=value,...' sorted)      ARGV[6] most keys it takes ('' for no limit)
-- ARGV[7] instance token  ARGV[8] lease TTL (s)   ARGV[9] '1' to register over a live token
--
-- A heartbeat (not a registration) that finds no registration at all means the store
-- lost its data (restarted empty, or failed over to a replica that had not seen it):
-- it registers the worker again and answers forgotten = '1', and the worker stops
-- trusting the leases it knew (worker/node.py, KnownLeases).
--
-- A registration or heartbeat also stamps when the store's data began, if it is not
-- stamped yet ('<prefix>born', see lease.lua and claim.lua's claim grace): a worker's
-- first claims then wait out the grace counted from the first worker's start.
--
-- Returns {status, server time, the registered instance token, forgotten ('1'/'0')}:
-- status 'ok', 'taken', 'superseded' or 'reaped'. Every liveness decision is measured
-- against this clock.
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local info = redis.call('HMGET', KEYS[2], 'instance', 'reaped', 'tags')
local registered = info[1]
local forgotten = ARGV[4] ~= '1' and not registered
if registered and registered ~= ARGV[7] then
  if ARGV[4] ~= '1' then
    return {'superseded', tostring(now), registered}
  end
  local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if beat and tonumber(beat) >= now - tonumber(ARGV[8]) and ARGV[9] ~= '1' then
    return {'taken', tostring(now), registered}
  end
end
if ARGV[4] ~= '1' and info[2] == '1' then
  return {'reaped', tostring(now), ARGV[7]}
end
redis.call('SET', KEYS[4], string.format('%.6f', now), 'NX')
redis.call('ZADD', KEYS[1], now, ARGV[1])
local fresh = ARGV[4] == '1' or not info[3]
redis.call('HSET', KEYS[2], 'capacity', ARGV[2], 'queue', ARGV[3], 'heartbeat', tostring(now))
if ARGV[4] == '1' or forgotten then
  redis.call('HDEL', KEYS[2], 'reaped', 'reaped_at', 'draining')
  redis.call('HSET', KEYS[2], 'instance', ARGV[7])
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
return {'ok', tostring(now), ARGV[7], forgotten and '1' or '0'}
