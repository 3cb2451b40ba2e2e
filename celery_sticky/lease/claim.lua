-- Claim a workflow key, or return its current lease. (lease.lua, put in front of this
-- file when it is loaded, defines the lease record and the placement helpers.)
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
-- is not). Key counts come from P keycount, kept by the scripts: O(workers), not O(keys).
--
-- KEYS[1] lease bucket hash (P leases:<b>)  KEYS[2] workers zset  KEYS[3] epoch counter
-- ARGV[1] lease TTL (s)   ARGV[2] candidate node ('' for none)
-- ARGV[3] key prefix ('<prefix>:')                  ARGV[4] member ('<workflow>:<key>')
-- ARGV[5] '1' to take over from a dead owner even before its queue was reaped (the reaper)
-- ARGV[6] policy when there is no candidate, or it may not take the key:
--         'least_loaded', 'hash', 'random', or 'none' (claim nothing)
-- ARGV[7] affinity: 'name=value,...' sorted ('' for none; a held lease's own is used then)
-- ARGV[8] a random number in [0, 1) for the 'random' policy
-- ARGV[9] the key's bucket number b
-- ARGV[10] the claim grace (s) of a store whose data is new: see below
--
-- Returns {owner, epoch, status, previous owner, over limit ('1' when every match was full)}:
-- status 0 = owned by a live worker, 1 = new claim, 2 = taken over from a dead owner,
-- -1 = no live worker may take it, -2 = pending: the owner is dead but not reaped yet
-- (route to its queue), -3 = nobody holds it (policy 'none'), -4 = moving to the returned
-- worker (route there; it waits until the move commits), -5 = the store's data began less
-- than the claim grace ago: nothing is claimed yet (ask again soon).
--
-- The claim grace: a worker trusts a lease it proved, without asking, only while it
-- has seen this store's 'born' stamp unchanged within the grace (worker/node.py,
-- KnownLeases). A store that lost its data (restarted empty, flushed) no longer knows
-- those leases; refusing every new claim for the grace after its data began means no
-- other worker is given a key before each worker stopped trusting what it knew.
local now = server_now()
local deadline = now - tonumber(ARGV[1])
local prefix = ARGV[3]
local member = ARGV[4]
local bucket = tonumber(ARGV[9])

local lease = lease_read(prefix, KEYS[1], member)
local owner = nil
local affinity = ARGV[7]
if lease then
  owner = lease.owner
  local beat = redis.call('ZSCORE', KEYS[2], owner)
  if beat and tonumber(beat) >= deadline
      and redis.call('HGET', prefix .. 'worker:' .. owner, 'draining') ~= '1' then
    if lease.moving_to and ARGV[2] ~= owner then
      if is_live(prefix, KEYS[2], deadline, lease.moving_to) and lease.moving_until >= now then
        return {lease.moving_to, lease.epoch, -4, owner, ''}
      end
      -- The target died, or the move missed its deadline: the move is off.
      lease.moving_id = ''
      writer().lease_write(KEYS[1], member, lease)
    end
    return {owner, lease.epoch, 0, '', ''}
  end
  -- Dead or draining: the key waits in the owner's queue until that queue moved on.
  if ARGV[5] ~= '1' and beat and redis.call('HGET', prefix .. 'worker:' .. owner, 'reaped') ~= '1' then
    return {owner, lease.epoch, -2, '', ''}
  end
  if affinity == '' then
    affinity = lease.affinity
  end
end

local P = placement()
local required = parse_affinity(affinity)
local candidate = ARGV[2]
local over_limit = ''
local chosen = nil
if candidate ~= '' then
  local f = P.fit(prefix, KEYS[2], deadline, candidate, required)
  if f and f.room then
    chosen = candidate
  end
end

if chosen == nil and ARGV[6] ~= 'none' then
  local nodes, fits, any_room = P.live_fits(prefix, KEYS[2], deadline, required)
  if candidate ~= '' and fits[candidate] and not any_room then
    chosen, over_limit = candidate, '1'  -- every match is full: the candidate keeps it
  else
    chosen, over_limit = P.pick(nodes, fits, any_room, ARGV[6], member, tonumber(ARGV[8]))
  end
end

if chosen == nil then
  if ARGV[6] == 'none' then
    return {'', '0', -3, '', ''}
  end
  return {'', '0', -1, '', ''}
end

if now < store_born(prefix, now) + tonumber(ARGV[10]) then
  return {'', '0', -5, '', ''}
end

local W = writer()
local epoch = W.next_epoch(KEYS[3], now)
local status, origin = 1, 'claimed'
if lease then
  W.disown(prefix, owner, lease.owner_id, bucket, member)
  status, origin = 2, 'taken_over'
end
local id = W.node_id(prefix, chosen, true)
W.lease_write(KEYS[1], member, {
  owner_id = id, epoch = epoch, since = string.format('%.3f', now), origin = origin,
  moving_id = '', moving_until = 0, affinity = affinity,
})
W.own(prefix, chosen, id, bucket, member)
return {chosen, epoch, status, owner or '', over_limit}
