-- Claim a workflow key, or return its current lease.
--
-- A lease is valid while its owner's heartbeat (score in the workers zset) is
-- younger than the TTL and the owner is not draining. When the owner is dead or
-- draining but its
-- direct queue has not been reaped yet, the key stays with it ("pending"): its
-- queued tasks must move first, or newer tasks would overtake them. A new claim
-- or a take-over draws the next epoch from a global counter; the counter starts
-- at the server time in microseconds, so epochs keep rising even after the
-- store restarts empty. Epochs are the fencing tokens.
--
-- KEYS[1] lease hash      KEYS[2] workers zset      KEYS[3] epoch counter
-- ARGV[1] lease TTL (s)   ARGV[2] candidate node, or '' for the least loaded live worker
-- ARGV[3] key prefix ('<prefix>:')                  ARGV[4] owned-set member ('<workflow>:<key>')
-- ARGV[5] '1' to take over from a dead owner even before its queue was reaped (the reaper)
--
-- Returns {owner, epoch, status[, previous owner]}: status 0 = owned by a live worker, 1 = new claim,
-- 2 = taken over from a dead owner, -1 = no live worker could take it,
-- -2 = pending: the owner is dead but not reaped yet (route to its queue).
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local deadline = now - tonumber(ARGV[1])

local function draining(node)
  return redis.call('HGET', ARGV[3] .. 'worker:' .. node, 'draining') == '1'
end

local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then
  local beat = redis.call('ZSCORE', KEYS[2], owner)
  local alive = beat and tonumber(beat) >= deadline
  if alive and not draining(owner) then
    return {owner, redis.call('HGET', KEYS[1], 'epoch'), 0}
  end
  -- Dead or draining: the key waits in the owner's queue until that queue moved on.
  if ARGV[5] ~= '1' and beat and redis.call('HGET', ARGV[3] .. 'worker:' .. owner, 'reaped') ~= '1' then
    return {owner, redis.call('HGET', KEYS[1], 'epoch'), -2}
  end
end

local candidate = ARGV[2]
if candidate == '' then
  local best, best_load = nil, nil
  for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], deadline, '+inf')) do
    if not draining(node) then
      local capacity = tonumber(redis.call('HGET', ARGV[3] .. 'worker:' .. node, 'capacity') or '1') or 1
      if capacity < 1 then capacity = 1 end
      local load = redis.call('SCARD', ARGV[3] .. 'owned:' .. node) / capacity
      if best == nil or load < best_load or (load == best_load and node < best) then
        best, best_load = node, load
      end
    end
  end
  if best == nil then
    return {'', '0', -1}
  end
  candidate = best
else
  local beat = redis.call('ZSCORE', KEYS[2], candidate)
  if not beat or tonumber(beat) < deadline or draining(candidate) then
    return {'', '0', -1}
  end
end

if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[3], string.format('%.0f', now * 1000000))
end
local epoch = string.format('%.0f', redis.call('INCR', KEYS[3]))
local status, origin = 1, 'claimed'
if owner then
  redis.call('SREM', ARGV[3] .. 'owned:' .. owner, ARGV[4])
  status, origin = 2, 'taken_over'
end
redis.call('HSET', KEYS[1], 'owner', candidate, 'epoch', epoch, 'since', tostring(now),
           'origin', origin)
redis.call('SADD', ARGV[3] .. 'owned:' .. candidate, ARGV[4])
return {candidate, epoch, status, owner or ''}
