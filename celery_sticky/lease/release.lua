-- Release a lease, if it is still held by the expected owner ('' = whoever holds it)
-- under the expected epoch ('' = any). (The record: lease.lua.)
--
-- With ARGV[6], the workflow ended: the key's record of applied producer numbers
-- (JSON) is kept at KEYS[2] for ARGV[7] seconds, in the same step as the release,
-- so the key's next owner knows where each producer's numbers stand (a paused
-- owner whose lease was taken is refused here: its record never lands).
--
-- KEYS[1] lease bucket hash (P leases:<b>)        KEYS[2] ended-record string
-- ARGV[1] key prefix ('<prefix>:')   ARGV[2] member ('<workflow>:<key>')
-- ARGV[3] expected owner or ''       ARGV[4] expected epoch or ''
-- ARGV[5] the key's bucket number b
-- ARGV[6] record (JSON) or ''        ARGV[7] its TTL (s)
--
-- Returns 1 when released, 0 when there was no such lease or another owner holds it.
local lease = lease_read(ARGV[1], KEYS[1], ARGV[2])
if not lease or (ARGV[3] ~= '' and lease.owner ~= ARGV[3]) then
  return 0
end
if ARGV[4] ~= '' and lease.epoch ~= ARGV[4] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[2])
writer().disown(ARGV[1], lease.owner, lease.owner_id, tonumber(ARGV[5]), ARGV[2])
if ARGV[6] and ARGV[6] ~= '' then
  redis.call('SET', KEYS[2], ARGV[6], 'EX', ARGV[7])
end
return 1
