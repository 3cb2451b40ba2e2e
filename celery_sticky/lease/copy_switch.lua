-- Point a key's hand-over copy at a new version, or retire it, fenced by the lease.
-- (The lease record: lease.lua.)
--
-- A copy is written first under a version name nobody reads (a Redis list, a file);
-- this script then makes it the key's copy, atomically with the check that the
-- writer still holds the key: it is the owner, under the epoch it wrote with, and
-- its heartbeat is younger than the TTL by this server's clock. A paused or cut-off
-- owner that resumes after another worker took the key over is refused here, so
-- nothing it wrote becomes visible. (A draining owner still heartbeats: it may
-- hand its keys over.)
--
-- The copy's record of applied producer numbers (small JSON) is kept beside the
-- pointer and switched with it, so a new owner's gate knows where each producer's
-- numbers stand before its first task adopts the copy.
--
-- A switch also starts the copy's log afresh (sync replication appends each commit's
-- changes to it: copy_append.lua): the old version's entries go with it, and the log
-- head records the new version's applied count and size, which the next entry must
-- follow on from. A version without a count (none given) takes no entries.
--
-- KEYS[1] lease bucket hash (P leases:<b>)      KEYS[2] workers zset
-- KEYS[3] pointer (string)
-- KEYS[4] the new version's Redis key (a list for the Redis store; any name otherwise)
-- KEYS[5] the copy's record of producer numbers (string)
-- KEYS[6] the copy's log (list)     KEYS[7] the log head (hash), see copy_append.lua
-- ARGV[1] lease TTL (s)   ARGV[2] writer (node)     ARGV[3] writer's epoch
-- ARGV[4] new version name ('' to retire the copy)
-- ARGV[5] '0' skips the check (only the test build the nemesis checker must catch)
-- ARGV[6] key prefix      ARGV[7] member ('<workflow>:<key>')
-- ARGV[8] the record (JSON), '' for none
-- ARGV[9] the version's applied count ('' for none)   ARGV[10] the version's bytes
--
-- Returns {1, previous version name or ''} when switched, {0, ''} when refused.
if ARGV[5] ~= '0' then
  local lease = lease_read(ARGV[6], KEYS[1], ARGV[7])
  if not lease or lease.owner ~= ARGV[2] or lease.epoch ~= ARGV[3] then
    return {0, ''}
  end
  local beat = redis.call('ZSCORE', KEYS[2], lease.owner)
  if not beat or tonumber(beat) < server_now() - tonumber(ARGV[1]) then
    return {0, ''}
  end
end
local previous = redis.call('GET', KEYS[3]) or ''
-- UNLINK: a long log is freed off Redis's main thread.
redis.call('UNLINK', KEYS[6], KEYS[7])
if ARGV[4] == '' then
  redis.call('DEL', KEYS[3], KEYS[5])
else
  redis.call('SET', KEYS[3], ARGV[4])
  redis.call('PERSIST', KEYS[4])
  if ARGV[8] ~= '' then
    redis.call('SET', KEYS[5], ARGV[8])
  else
    redis.call('DEL', KEYS[5])
  end
  if ARGV[9] ~= '' then
    redis.call('HSET', KEYS[7], 'seq', ARGV[9], 'bytes', '0', 'base_bytes', ARGV[10])
  end
end
return {1, previous}
