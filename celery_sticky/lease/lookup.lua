-- Look a lease up without claiming: {owner, epoch, alive, origin, affinity, moving_to, since},
-- or {} when nobody holds it. origin is 'claimed', 'taken_over' (from a dead owner)
-- or 'moved' (on purpose, with its state). (The record: lease.lua.)
--
-- KEYS[1] lease bucket hash (P leases:<b>)      KEYS[2] workers zset
-- ARGV[1] lease TTL (s)   ARGV[2] key prefix    ARGV[3] member ('<workflow>:<key>')
local lease = lease_read(ARGV[2], KEYS[1], ARGV[3])
if not lease then
  return {}
end
local now = server_now()
local beat = redis.call('ZSCORE', KEYS[2], lease.owner)
local alive = 0
if beat and tonumber(beat) >= now - tonumber(ARGV[1]) then
  alive = 1
end
return {lease.owner, lease.epoch, alive, lease.origin, lease.affinity, lease.moving_to or '',
        lease.since}
