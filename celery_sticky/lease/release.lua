-- Release a lease, if it is still held by the expected owner ('' = whoever holds it)
-- under the expected epoch ('' = any). (The record: lease.lua.)
--
-- KEYS[1] lease bucket hash (P leases:<b>)
-- ARGV[1] key prefix ('<prefix>:')   ARGV[2] member ('<workflow>:<key>')
-- ARGV[3] expected owner or ''       ARGV[4] expected epoch or ''
-- ARGV[5] the key's bucket number b
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
return 1
