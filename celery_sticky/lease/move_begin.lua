-- Start moving a key to another worker on purpose (rebalance, `celery sticky move`).
--
-- From now on publishers route the key's new tasks to the target, which holds
-- them until the move commits; the owner still runs what it already has. The
-- owner then runs celery-sticky's move task through the key's line (after every
-- task queued before it), exports the state and commits the move (move_commit.lua).
--
-- A move not committed by its deadline is off (claim.lua drops it), so a move
-- task that is lost or fails never leaves the key's new tasks waiting for good.
--
-- KEYS[1] lease hash      KEYS[2] workers zset
-- ARGV[1] lease TTL (s)   ARGV[2] key prefix   ARGV[3] target node
-- ARGV[4] expected owner ('' for whoever holds it)
-- ARGV[5] seconds from now until the move is off if it has not committed
--
-- Returns {status, owner, epoch}: 1 = started, 0 = nobody holds the key (or not the
-- expected owner), -1 = the owner is not live, -2 = the target is not live,
-- -3 = the target lacks a tag of the key's affinity, -4 = a move is already under way,
-- -5 = the target owns the key already.
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local deadline = now - tonumber(ARGV[1])

local function live(node)
  local beat = redis.call('ZSCORE', KEYS[2], node)
  return beat and tonumber(beat) >= deadline
    and redis.call('HGET', ARGV[2] .. 'worker:' .. node, 'draining') ~= '1'
end

local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or (ARGV[4] ~= '' and owner ~= ARGV[4]) then
  return {0, owner or '', '0'}
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if owner == ARGV[3] then
  return {-5, owner, epoch}
end
if not live(owner) then
  return {-1, owner, epoch}
end
local moving_to = redis.call('HGET', KEYS[1], 'moving_to')
local moving_until = tonumber(redis.call('HGET', KEYS[1], 'moving_until') or '0')
if moving_to and live(moving_to) and moving_until >= now then
  return {-4, owner, epoch}
end
if not live(ARGV[3]) then
  return {-2, owner, epoch}
end
local affinity = redis.call('HGET', KEYS[1], 'affinity') or ''
for pair in string.gmatch(affinity, '[^,]+') do
  local name, value = string.match(pair, '^([^=]+)=(.*)$')
  if redis.call('HGET', ARGV[2] .. 'worker:' .. ARGV[3], 'tag:' .. name) ~= value then
    return {-3, owner, epoch}
  end
end
redis.call('HSET', KEYS[1], 'moving_to', ARGV[3],
           'moving_until', string.format('%.6f', now + tonumber(ARGV[5])))
return {1, owner, epoch}
