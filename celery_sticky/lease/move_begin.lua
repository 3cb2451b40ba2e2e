-- Start moving a key to another worker on purpose (rebalance, `celery sticky move`).
-- (The lease record: lease.lua.)
--
-- From now on publishers route the key's new tasks to the target, which holds
-- them until the move commits; the owner still runs what it already has. The
-- owner then runs celery-sticky's move task through the key's line (after every
-- task queued before it), exports the state and commits the move (move_commit.lua).
--
-- A move not committed by its deadline is off (claim.lua drops it), so a move
-- task that is lost or fails never leaves the key's new tasks waiting for good.
--
-- KEYS[1] lease bucket hash (P leases:<b>)      KEYS[2] workers zset
-- ARGV[1] lease TTL (s)   ARGV[2] key prefix   ARGV[3] target node
-- ARGV[4] expected owner ('' for whoever holds it)
-- ARGV[5] seconds from now until the move is off if it has not committed
-- ARGV[6] member ('<workflow>:<key>')
--
-- Returns {status, owner, epoch}: 1 = started, 0 = nobody holds the key (or not the
-- expected owner), -1 = the owner is not live, -2 = the target is not live,
-- -3 = the target lacks a tag of the key's affinity, -4 = a move is already under way,
-- -5 = the target owns the key already.
local now = server_now()
local deadline = now - tonumber(ARGV[1])
local prefix = ARGV[2]

local lease = lease_read(prefix, KEYS[1], ARGV[6])
if not lease or (ARGV[4] ~= '' and lease.owner ~= ARGV[4]) then
  return {0, lease and lease.owner or '', '0'}
end
local owner, epoch = lease.owner, lease.epoch
if owner == ARGV[3] then
  return {-5, owner, epoch}
end
if not is_live(prefix, KEYS[2], deadline, owner) then
  return {-1, owner, epoch}
end
if lease.moving_to and is_live(prefix, KEYS[2], deadline, lease.moving_to)
    and lease.moving_until >= now then
  return {-4, owner, epoch}
end
if not is_live(prefix, KEYS[2], deadline, ARGV[3]) then
  return {-2, owner, epoch}
end
for _, tag in ipairs(parse_affinity(lease.affinity)) do
  if redis.call('HGET', prefix .. 'worker:' .. ARGV[3], tag[1]) ~= tag[2] then
    return {-3, owner, epoch}
  end
end
local W = writer()
lease.moving_id = W.node_id(prefix, ARGV[3], true)
lease.moving_until = now + tonumber(ARGV[5])
W.lease_write(KEYS[1], ARGV[6], lease)
return {1, owner, epoch}
