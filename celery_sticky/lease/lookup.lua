-- Look a lease up without claiming: {owner, epoch, alive, origin, affinity, moving_to},
-- or {} when nobody holds it. origin is 'claimed', 'taken_over' (from a dead owner)
-- or 'moved' (on purpose, with its state).
--
-- KEYS[1] lease hash      KEYS[2] workers zset
-- ARGV[1] lease TTL (s)
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  return {}
end
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local beat = redis.call('ZSCORE', KEYS[2], owner)
local alive = 0
if beat and tonumber(beat) >= now - tonumber(ARGV[1]) then
  alive = 1
end
return {owner, redis.call('HGET', KEYS[1], 'epoch'), alive,
        redis.call('HGET', KEYS[1], 'origin') or 'claimed',
        redis.call('HGET', KEYS[1], 'affinity') or '',
        redis.call('HGET', KEYS[1], 'moving_to') or ''}
