-- Append one commit's changes to a key's hand-over copy (sync replication), fenced by
-- the lease. (The lease record: lease.lua; what starts a copy and resets its log:
-- copy_switch.lua.)
--
-- A key's copy is a full version (the pointer names it; its bytes are in the hand-over
-- store) followed by a log of the commits since: one signed entry per commit, in a
-- Redis list of the lease store whichever the hand-over store is (entries are small:
-- the fields a commit changed). With sync replication this script is a commit's one
-- Redis call. It appends the entry atomically with the checks that:
--
-- * the writer still holds the key: the owner, under the epoch it wrote with, and its
--   heartbeat younger than the TTL by this server's clock (as copy_switch.lua checks).
--   A paused or cut-off owner that resumes after another worker took the key over is
--   refused here: nothing it sent becomes part of the copy;
-- * the entry follows on: the pointer still names the version the writer's log grows
--   from, and the log ends with the writer's previous commit. A writer that missed a
--   commit (a failed call, a crash between its commit and this call), or whose version
--   a switch replaced, writes a new full version instead;
-- * the log stays small: at its most entries, or past its bytes (a fraction of the
--   version's size, never less than a floor), the writer writes a new full version.
--
-- The copy's record of applied producer numbers is kept beside the pointer, as
-- copy_switch.lua keeps it, so a new owner's gate knows where each producer stands.
--
-- KEYS[1] lease bucket hash (P leases:<b>)   KEYS[2] workers zset
-- KEYS[3] pointer (string)                   KEYS[4] log (list of signed entries)
-- KEYS[5] log head (hash: seq = the applied count the copy reaches, bytes = the
--         log's, base_bytes = the version's)
-- KEYS[6] the copy's record of producer numbers (string)
-- ARGV[1] lease TTL (s)   ARGV[2] writer (node)   ARGV[3] writer's epoch
-- ARGV[4] the version the writer's log grows from
-- ARGV[5] '0' skips the lease check (only the test build the nemesis checker must catch)
-- ARGV[6] key prefix      ARGV[7] member ('<workflow>:<key>')
-- ARGV[8] the copy's seq the entry follows   ARGV[9] the entry's seq
-- ARGV[10] the entry (signed bytes)          ARGV[11] the record (JSON)
-- ARGV[12] most entries   ARGV[13] most log bytes per version byte
-- ARGV[14] log bytes always allowed
--
-- Returns 1 when appended (or appended already: a retry whose first reply was lost),
-- 0 when refused (the writer lost the key), -1 when not appended: the writer writes a
-- new full version.
if ARGV[5] ~= '0' then
  local lease = lease_read(ARGV[6], KEYS[1], ARGV[7])
  if not lease or lease.owner ~= ARGV[2] or lease.epoch ~= ARGV[3] then
    return 0
  end
  local beat = redis.call('ZSCORE', KEYS[2], lease.owner)
  if not beat or tonumber(beat) < server_now() - tonumber(ARGV[1]) then
    return 0
  end
end
if redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return -1
end
local head = redis.call('HMGET', KEYS[5], 'seq', 'bytes', 'base_bytes')
if head[1] == ARGV[9] and redis.call('LINDEX', KEYS[4], -1) == ARGV[10] then
  return 1
end
if head[1] ~= ARGV[8] then
  return -1
end
local used = (tonumber(head[2]) or 0) + #ARGV[10]
local budget = math.max(tonumber(ARGV[14]), tonumber(ARGV[13]) * (tonumber(head[3]) or 0))
if used > budget or redis.call('LLEN', KEYS[4]) >= tonumber(ARGV[12]) then
  return -1
end
redis.call('RPUSH', KEYS[4], ARGV[10])
redis.call('HSET', KEYS[5], 'seq', ARGV[9], 'bytes', string.format('%d', used))
redis.call('SET', KEYS[6], ARGV[11])
return 1
