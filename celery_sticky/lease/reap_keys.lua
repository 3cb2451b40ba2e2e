-- Hand a reaped worker's keys over to live workers, a batch of its owned buckets at a
-- time (the reaper calls it until it answers -1). (The record: lease.lua.)
--
-- Only for a worker marked reaped (its queue moved on) that is not live: what claim.lua
-- would do for each key at its next task (a take-over under a new epoch, origin
-- 'taken_over', the placement policy among live workers that match the key's affinity),
-- done now, so that no key is left with a dead owner and the dead worker's entries go.
-- A key no live worker may take (its affinity) stays; its next task takes it over.
-- Each call reads only the dead worker's own buckets: its work is O(its keys), never
-- O(every key in Redis), and one call blocks Redis for about `budget` keys' worth.
--
-- KEYS[1] workers zset    KEYS[2] epoch counter
-- ARGV[1] lease TTL (s)   ARGV[2] key prefix      ARGV[3] the dead worker
-- ARGV[4] first owned bucket of this call (0 .. 4095)   ARGV[5] keys per call (about)
-- ARGV[6] policy ('least_loaded', 'hash', 'random')    ARGV[7] a random salt ('random')
--
-- Returns {next bucket or -1 when done, keys handed over, keys left (no live worker may
-- take them), status}: status 'ok', or 'not_reaped' (live again, or not marked reaped:
-- nothing done).
local now = server_now()
local deadline = now - tonumber(ARGV[1])
local prefix, dead = ARGV[2], ARGV[3]
local beat = redis.call('ZSCORE', KEYS[1], dead)
if (beat and tonumber(beat) >= deadline)
    or redis.call('HGET', prefix .. 'worker:' .. dead, 'reaped') ~= '1' then
  return {-1, 0, 0, 'not_reaped'}
end
local W, P = writer(), placement()
local id = W.node_id(prefix, dead, false)
if id == '' then
  return {-1, 0, 0, 'ok'}
end

local eligible = {}  -- affinity -> nodes that may take such a key
local shared = {}    -- node -> its fit, shared by every affinity (counts rise as keys land)
local function candidates(affinity)
  local nodes = eligible[affinity]
  if nodes == nil then
    local fits
    nodes, fits = P.live_fits(prefix, KEYS[1], deadline, parse_affinity(affinity))
    for _, node in ipairs(nodes) do
      shared[node] = shared[node] or fits[node]
    end
    eligible[affinity] = nodes
  end
  local any_room = false
  for _, node in ipairs(nodes) do
    any_room = any_room or shared[node].room
  end
  return nodes, any_room
end

local since = string.format('%.3f', now)
local moved, left, seen = 0, 0, 0
local budget = tonumber(ARGV[5])
local b = tonumber(ARGV[4])
while b < OWNED_BUCKETS and seen < budget do
  for _, member in ipairs(redis.call('HKEYS', W.owned_bucket_key(prefix, id, b))) do
    seen = seen + 1
    local lb = W.bucket_of(member)
    local lkey = W.lease_bucket_key(prefix, lb)
    local lease = lease_read(prefix, lkey, member)
    if not lease or lease.owner_id ~= id then
      W.disown(prefix, dead, id, lb, member)  -- a stray entry
    else
      local nodes, any_room = candidates(lease.affinity)
      local rand = tonumber(string.sub(redis.sha1hex(ARGV[7] .. member), 1, 13), 16)
                   / 4503599627370496
      local chosen = P.pick(nodes, shared, any_room, ARGV[6], member, rand)
      if chosen == nil then
        left = left + 1
      else
        W.disown(prefix, dead, id, lb, member)
        local chosen_id = W.node_id(prefix, chosen, true)
        W.lease_write(lkey, member, {
          owner_id = chosen_id, epoch = W.next_epoch(KEYS[2], now), since = since,
          origin = 'taken_over', moving_id = '', moving_until = 0, affinity = lease.affinity,
        })
        W.own(prefix, chosen, chosen_id, lb, member)
        local f = shared[chosen]
        f.keys = f.keys + 1
        f.room = f.limit == nil or f.keys < f.limit
        moved = moved + 1
      end
    end
  end
  b = b + 1
end
if b >= OWNED_BUCKETS then
  b = -1
end
return {b, moved, left, 'ok'}
