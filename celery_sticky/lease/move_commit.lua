-- Finish a move started by move_begin.lua: the target becomes the owner under a
-- new epoch (its first task imports the state the owner just exported).
--
-- KEYS[1] lease hash      KEYS[2] workers zset      KEYS[3] epoch counter
-- ARGV[1] lease TTL (s)   ARGV[2] key prefix        ARGV[3] owned-set member
-- ARGV[4] owner           ARGV[5] its epoch         ARGV[6] target node
--
-- Returns {status, owner, epoch}: 1 = moved (the new lease), 0 = not moved: the lease
-- changed meanwhile, or the target is gone or the deadline passed (the move is called
-- off; the owner keeps it).
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local owner = redis.call('HGET', KEYS[1], 'owner')
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if owner ~= ARGV[4] or epoch ~= ARGV[5] or redis.call('HGET', KEYS[1], 'moving_to') ~= ARGV[6] then
  return {0, owner or '', epoch or '0'}
end
local beat = redis.call('ZSCORE', KEYS[2], ARGV[6])
if not beat or tonumber(beat) < now - tonumber(ARGV[1])
    or redis.call('HGET', ARGV[2] .. 'worker:' .. ARGV[6], 'draining') == '1'
    or tonumber(redis.call('HGET', KEYS[1], 'moving_until') or '0') < now then
  redis.call('HDEL', KEYS[1], 'moving_to', 'moving_until')
  return {0, owner, epoch}
end
local new_epoch = string.format('%.0f', redis.call('INCR', KEYS[3]))
redis.call('HSET', KEYS[1], 'owner', ARGV[6], 'epoch', new_epoch, 'since', tostring(now),
           'origin', 'moved')
redis.call('HDEL', KEYS[1], 'moving_to', 'moving_until')
redis.call('SREM', ARGV[2] .. 'owned:' .. owner, ARGV[3])
redis.call('SADD', ARGV[2] .. 'owned:' .. ARGV[6], ARGV[3])
return {1, ARGV[6], new_epoch}
