-- Claim a workflow key, or return its current lease.
--
-- A lease is valid while its owner's heartbeat (score in the workers zset) is
-- younger than the TTL and the owner is not draining. When the owner is dead or
-- draining but its direct queue has not been reaped yet, the key stays with it
-- ("pending"): its queued tasks must move first, or newer tasks would overtake
-- them. A new claim or a take-over draws the next epoch from a global counter;
-- the counter starts at the server time in microseconds, so epochs keep rising
-- even after the store restarts empty. Epochs are the fencing tokens.
--
-- Only a live, non-draining worker carrying every tag of the key's affinity may
-- claim it. Among those, workers below their key limit are preferred; when all
-- are full the policy picks among all of them (the limit is soft, the affinity
-- is not).
--
-- KEYS[1] lease hash      KEYS[2] workers zset      KEYS[3] epoch counter
-- ARGV[1] lease TTL (s)   ARGV[2] candidate node ('' for none)
-- ARGV[3] key prefix ('<prefix>:')                  ARGV[4] owned-set member ('<workflow>:<key>')
-- ARGV[5] '1' to take over from a dead owner even before its queue was reaped (the reaper)
-- ARGV[6] policy when there is no candidate, or it may not take the key:
--         'least_loaded', 'hash', 'random', or 'none' (claim nothing)
-- ARGV[7] affinity: 'name=value,...' sorted ('' for none; a held lease's own is used then)
-- ARGV[8] a random number in [0, 1) for the 'random' policy
--
-- Returns {owner, epoch, status, previous owner, over limit ('1' when every match was full)}:
-- status 0 = owned by a live worker, 1 = new claim, 2 = taken over from a dead owner,
-- -1 = no live worker may take it, -2 = pending: the owner is dead but not reaped yet
-- (route to its queue), -3 = nobody holds it (policy 'none'), -4 = moving to the returned
-- worker (route there; it waits until the move commits).
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local deadline = now - tonumber(ARGV[1])
local prefix = ARGV[3]

local function info(node)
  return prefix .. 'worker:' .. node
end

local function live(node)
  local beat = redis.call('ZSCORE', KEYS[2], node)
  return beat and tonumber(beat) >= deadline and redis.call('HGET', info(node), 'draining') ~= '1'
end

local owner = redis.call('HGET', KEYS[1], 'owner')
local affinity = ARGV[7]
if owner then
  local beat = redis.call('ZSCORE', KEYS[2], owner)
  if beat and tonumber(beat) >= deadline and redis.call('HGET', info(owner), 'draining') ~= '1' then
    local moving_to = redis.call('HGET', KEYS[1], 'moving_to')
    if moving_to and ARGV[2] ~= owner then
      local moving_until = tonumber(redis.call('HGET', KEYS[1], 'moving_until') or '0')
      if live(moving_to) and moving_until >= now then
        return {moving_to, redis.call('HGET', KEYS[1], 'epoch'), -4, owner, ''}
      end
      -- The target died, or the move missed its deadline: the move is off.
      redis.call('HDEL', KEYS[1], 'moving_to', 'moving_until')
    end
    return {owner, redis.call('HGET', KEYS[1], 'epoch'), 0, '', ''}
  end
  -- Dead or draining: the key waits in the owner's queue until that queue moved on.
  if ARGV[5] ~= '1' and beat and redis.call('HGET', info(owner), 'reaped') ~= '1' then
    return {owner, redis.call('HGET', KEYS[1], 'epoch'), -2, '', ''}
  end
  if affinity == '' then
    affinity = redis.call('HGET', KEYS[1], 'affinity') or ''
  end
end

local required = {}
for pair in string.gmatch(affinity, '[^,]+') do
  local name, value = string.match(pair, '^([^=]+)=(.*)$')
  required[#required + 1] = {'tag:' .. name, value}
end

-- {matches, has room, capacity} of a node, or nil when it may not take the key.
local function fit(node)
  if not live(node) then
    return nil
  end
  local hash = info(node)
  for _, tag in ipairs(required) do
    if redis.call('HGET', hash, tag[1]) ~= tag[2] then
      return nil
    end
  end
  local capacity = tonumber(redis.call('HGET', hash, 'capacity') or '1') or 1
  if capacity < 1 then capacity = 1 end
  local keys = redis.call('SCARD', prefix .. 'owned:' .. node)
  local limit = tonumber(redis.call('HGET', hash, 'max_keys') or '')
  return {room = limit == nil or keys < limit, capacity = capacity, keys = keys}
end

local candidate = ARGV[2]
local over_limit = ''
local chosen = nil
if candidate ~= '' then
  local f = fit(candidate)
  if f and f.room then
    chosen = candidate
  end
end

if chosen == nil and ARGV[6] ~= 'none' then
  local nodes, fits, any_room = {}, {}, false
  for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], deadline, '+inf')) do
    local f = fit(node)
    if f then
      nodes[#nodes + 1] = node
      fits[node] = f
      any_room = any_room or f.room
    end
  end
  if candidate ~= '' and fits[candidate] and not any_room then
    chosen, over_limit = candidate, '1'  -- every match is full: the candidate keeps it
  else
    local pool = {}
    for _, node in ipairs(nodes) do
      if fits[node].room or not any_room then
        pool[#pool + 1] = node
      end
    end
    if #pool > 0 and not any_room then
      over_limit = '1'
    end
    local policy = ARGV[6]
    if policy == 'hash' then
      -- Weighted rendezvous hashing: each node scores capacity / -ln(u), u uniform
      -- in (0, 1) from sha1(node, key). A joining node takes only the keys it now
      -- scores highest on (about its share of the capacity); no other key moves.
      local best_score = nil
      for _, node in ipairs(pool) do
        local u = (tonumber(string.sub(redis.sha1hex(node .. '\n' .. ARGV[4]), 1, 13), 16) + 0.5)
                  / 4503599627370496
        local score = fits[node].capacity / -math.log(u)
        if best_score == nil or score > best_score then
          chosen, best_score = node, score
        end
      end
    elseif policy == 'random' then
      local total = 0
      for _, node in ipairs(pool) do
        total = total + fits[node].capacity
      end
      local point = tonumber(ARGV[8]) * total
      for _, node in ipairs(pool) do
        chosen = node
        point = point - fits[node].capacity
        if point < 0 then break end
      end
    else  -- least_loaded: fewest keys per unit of capacity, ties by name
      local best_load = nil
      for _, node in ipairs(pool) do
        local load = fits[node].keys / fits[node].capacity
        if best_load == nil or load < best_load or (load == best_load and node < chosen) then
          chosen, best_load = node, load
        end
      end
    end
  end
end

if chosen == nil then
  if ARGV[6] == 'none' then
    return {'', '0', -3, '', ''}
  end
  return {'', '0', -1, '', ''}
end

if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[3], string.format('%.0f', now * 1000000))
end
local epoch = string.format('%.0f', redis.call('INCR', KEYS[3]))
local status, origin = 1, 'claimed'
if owner then
  redis.call('SREM', prefix .. 'owned:' .. owner, ARGV[4])
  status, origin = 2, 'taken_over'
end
redis.call('HSET', KEYS[1], 'owner', chosen, 'epoch', epoch, 'since', tostring(now),
           'origin', origin, 'affinity', affinity)
redis.call('HDEL', KEYS[1], 'moving_to', 'moving_until')
redis.call('SADD', prefix .. 'owned:' .. chosen, ARGV[4])
return {chosen, epoch, status, owner or '', over_limit}
