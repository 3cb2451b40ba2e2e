-- Register a worker or renew its heartbeat. Costs the same whatever the
-- number of keys the worker owns: leases point at the worker, not the clock.
-- A worker that registers again (same name) is no longer "reaped" or "draining":
-- the leases nobody took over from it are valid again.
--
-- KEYS[1] workers zset    KEYS[2] worker info hash
-- ARGV[1] node name       ARGV[2] capacity    ARGV[3] direct queue name
-- ARGV[4] '1' when (re)registering at start
--
-- Returns the server time, which every liveness decision is measured against.
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'capacity', ARGV[2], 'queue', ARGV[3], 'heartbeat', tostring(now))
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[2], 'reaped', 'reaped_at', 'draining')
end
return tostring(now)
