-- Finish a move started by move_begin.lua: the target becomes the owner under a
-- new epoch (its first task imports the state the owner just exported).
-- (The lease record: lease.lua.)
--
-- KEYS[1] lease bucket hash (P leases:<b>)  KEYS[2] workers zset  KEYS[3] epoch counter
-- ARGV[1] lease TTL (s)   ARGV[2] key prefix        ARGV[3] member ('<workflow>:<key>')
-- ARGV[4] owner           ARGV[5] its epoch         ARGV[6] target node
-- ARGV[7] the key's bucket number b
--
-- Returns {status, owner, epoch}: 1 = moved (the new lease), 0 = not moved: the lease
-- changed meanwhile, or the target is gone or the deadline passed (the move is called
-- off; the owner keeps it).
local now = server_now()
local prefix = ARGV[2]
local W = writer()
local lease = lease_read(prefix, KEYS[1], ARGV[3])
if not lease or lease.owner ~= ARGV[4] or lease.epoch ~= ARGV[5]
    or lease.moving_to ~= ARGV[6] then
  return {0, lease and lease.owner or '', lease and lease.epoch or '0'}
end
local beat = redis.call('ZSCORE', KEYS[2], ARGV[6])
if not beat or tonumber(beat) < now - tonumber(ARGV[1])
    or redis.call('HGET', prefix .. 'worker:' .. ARGV[6], 'draining') == '1'
    or lease.moving_until < now then
  lease.moving_id = ''
  W.lease_write(KEYS[1], ARGV[3], lease)
  return {0, lease.owner, lease.epoch}
end
local new_epoch = string.format('%.0f', redis.call('INCR', KEYS[3]))
local bucket = tonumber(ARGV[7])
W.disown(prefix, lease.owner, lease.owner_id, bucket, ARGV[3])
local id = lease.moving_id
W.lease_write(KEYS[1], ARGV[3], {
  owner_id = id, epoch = new_epoch, since = string.format('%.3f', now), origin = 'moved',
  moving_id = '', moving_until = 0, affinity = lease.affinity,
})
W.own(prefix, ARGV[6], id, bucket, ARGV[3])
return {1, ARGV[6], new_epoch}
