-- The lease record, shared by every script that reads or writes a lease: the store
-- puts this file in front of claim, lookup, release, move_begin, move_commit,
-- copy_switch and reap_keys when it loads them, so they all read and write one format.
--
-- Where a lease lives (P = '<prefix>:', b = the key's bucket, see lease/__init__.py):
--   P leases:<b>           hash  '<workflow>:<key>' -> '<owner id>|<epoch>|<since>|<origin>|
--                                 <moving_to id>|<moving_until>|<affinity>'
--                                 (origin: c claimed, t taken_over, m moved; since and
--                                 moving_until: server time in s, 3 decimals; affinity last,
--                                 so it may hold any character)
--   P owned:<id>:<b % 4096> hash  '<workflow>:<key>' -> '' for each key the node holds
--   P keycount             hash  node -> how many keys it holds (= its owned entries)
--   P node-id / node-name  hash  node -> short id / id -> node (ids never reused)
--   P node-seq             string the last id given out
--   P born                 string server time (s) this store's data began: set by the
--                                 first script that finds it missing (a new store, or
--                                 one that restarted empty or was flushed)
-- b = first 8 hex digits of sha1('<workflow>:<key>') mod 16384, the same in Python
-- (LeaseStore.bucket). Small buckets keep Redis's compact listpack encoding.
--
-- Redis runs a script's whole text on every call, and each 'local function' is a new
-- closure each time (about 0.2 µs apiece): what only writes need is built by writer(),
-- and placement by placement(), on the paths that use them; a lookup or the claim of
-- an owned key builds neither.
local OWNED_BUCKETS = 4096

local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- When this store's data began (see P born above); sets it to now when missing.
local function store_born(prefix, now)
  local born = redis.call('GET', prefix .. 'born')
  if born then
    return tonumber(born)
  end
  redis.call('SET', prefix .. 'born', string.format('%.6f', now))
  return now
end

local function node_name(prefix, id)
  if id == '' then
    return ''
  end
  return redis.call('HGET', prefix .. 'node-name', id) or ''
end

-- The lease of member in the bucket hash, as a table, or nil when nobody holds it.
local function lease_read(prefix, bucket_key, member)
  local raw = redis.call('HGET', bucket_key, member)
  if not raw then
    return nil
  end
  local id, epoch, since, origin, moving, moving_until, affinity =
    string.match(raw, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  local lease = {
    owner_id = id, owner = node_name(prefix, id), epoch = epoch, since = since,
    origin = (origin == 't' and 'taken_over') or (origin == 'm' and 'moved') or 'claimed',
    affinity = affinity, moving_id = moving, moving_to = nil,
    moving_until = tonumber(moving_until) or 0,
  }
  if moving ~= '' then
    lease.moving_to = node_name(prefix, moving)
  end
  return lease
end

-- A registered worker whose heartbeat is younger than the TTL and that is not draining.
local function is_live(prefix, workers_key, deadline, node)
  local beat = redis.call('ZSCORE', workers_key, node)
  return beat and tonumber(beat) >= deadline
    and redis.call('HGET', prefix .. 'worker:' .. node, 'draining') ~= '1'
end

local function parse_affinity(affinity)
  local required = {}
  for pair in string.gmatch(affinity, '[^,]+') do
    local name, value = string.match(pair, '^([^=]+)=(.*)$')
    required[#required + 1] = {'tag:' .. name, value}
  end
  return required
end

-- What writing a lease takes: W.lease_write, W.own, W.disown, W.node_id, W.next_epoch,
-- W.bucket_of, W.lease_bucket_key, W.owned_bucket_key.
local function writer()
  local W = {}

  function W.bucket_of(member)
    return tonumber(string.sub(redis.sha1hex(member), 1, 8), 16) % 16384
  end

  function W.lease_bucket_key(prefix, bucket)
    return prefix .. 'leases:' .. bucket
  end

  function W.owned_bucket_key(prefix, id, bucket)
    return prefix .. 'owned:' .. id .. ':' .. (bucket % OWNED_BUCKETS)
  end

  -- The node's short id ('' when it has none and create is false).
  function W.node_id(prefix, node, create)
    local id = redis.call('HGET', prefix .. 'node-id', node)
    if not id and create then
      id = tostring(redis.call('INCR', prefix .. 'node-seq'))
      redis.call('HSET', prefix .. 'node-id', node, id)
      redis.call('HSET', prefix .. 'node-name', id, node)
    end
    return id or ''
  end

  function W.lease_write(bucket_key, member, lease)
    local moving_until = ''
    if lease.moving_id ~= '' then
      moving_until = string.format('%.3f', lease.moving_until)
    end
    local origin = (lease.origin == 'taken_over' and 't') or (lease.origin == 'moved' and 'm')
      or 'c'
    redis.call('HSET', bucket_key, member, lease.owner_id .. '|' .. lease.epoch .. '|'
      .. lease.since .. '|' .. origin .. '|' .. lease.moving_id .. '|' .. moving_until .. '|'
      .. lease.affinity)
  end

  -- Record that node (id) holds member, keeping its key count equal to its entries.
  function W.own(prefix, node, id, bucket, member)
    if redis.call('HSET', W.owned_bucket_key(prefix, id, bucket), member, '') == 1 then
      redis.call('HINCRBY', prefix .. 'keycount', node, 1)
    end
  end

  function W.disown(prefix, node, id, bucket, member)
    if id ~= '' and redis.call('HDEL', W.owned_bucket_key(prefix, id, bucket), member) == 1 then
      if redis.call('HINCRBY', prefix .. 'keycount', node, -1) <= 0 then
        redis.call('HDEL', prefix .. 'keycount', node)
      end
    end
  end

  function W.next_epoch(epoch_key, now)
    if redis.call('EXISTS', epoch_key) == 0 then
      redis.call('SET', epoch_key, string.format('%.0f', now * 1000000))
    end
    return string.format('%.0f', redis.call('INCR', epoch_key))
  end

  return W
end

-- Placement among live workers: P.fit, P.live_fits, P.pick.
local function placement()
  local P = {}

  -- {room, capacity, keys, limit} of a node, or nil when it may not take a key that
  -- requires these tags.
  function P.fit(prefix, workers_key, deadline, node, required)
    if not is_live(prefix, workers_key, deadline, node) then
      return nil
    end
    local hash = prefix .. 'worker:' .. node
    for _, tag in ipairs(required) do
      if redis.call('HGET', hash, tag[1]) ~= tag[2] then
        return nil
      end
    end
    local capacity = tonumber(redis.call('HGET', hash, 'capacity') or '1') or 1
    if capacity < 1 then capacity = 1 end
    local keys = tonumber(redis.call('HGET', prefix .. 'keycount', node) or '0') or 0
    local limit = tonumber(redis.call('HGET', hash, 'max_keys') or '')
    return {room = limit == nil or keys < limit, capacity = capacity, keys = keys, limit = limit}
  end

  -- Every live worker that may take such a key: nodes (in registry order), fits by
  -- node, and whether any has room.
  function P.live_fits(prefix, workers_key, deadline, required)
    local nodes, fits, any_room = {}, {}, false
    for _, node in ipairs(redis.call('ZRANGEBYSCORE', workers_key, deadline, '+inf')) do
      local f = P.fit(prefix, workers_key, deadline, node, required)
      if f then
        nodes[#nodes + 1] = node
        fits[node] = f
        any_room = any_room or f.room
      end
    end
    return nodes, fits, any_room
  end

  -- The policy's pick among nodes (those with room, or all when none has any), and
  -- '1' when every match was full. rand is uniform in [0, 1) ('random' policy).
  function P.pick(nodes, fits, any_room, policy, member, rand)
    local pool = {}
    for _, node in ipairs(nodes) do
      if fits[node].room or not any_room then
        pool[#pool + 1] = node
      end
    end
    local over_limit = ''
    if #pool > 0 and not any_room then
      over_limit = '1'
    end
    local chosen = nil
    if policy == 'hash' then
      -- Weighted rendezvous hashing: each node scores capacity / -ln(u), u uniform
      -- in (0, 1) from sha1(node, key). A joining node takes only the keys it now
      -- scores highest on (about its share of the capacity); no other key moves.
      local best_score = nil
      for _, node in ipairs(pool) do
        local u = (tonumber(string.sub(redis.sha1hex(node .. '\n' .. member), 1, 13), 16) + 0.5)
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
      local point = rand * total
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
    return chosen, over_limit
  end

  return P
end

-- end of lease.lua
