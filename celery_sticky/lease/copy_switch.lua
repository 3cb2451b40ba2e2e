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
-- KEYS[1] lease bucket hash (P leases:<b>)      KEYS[2] workers zset
-- KEYS[3] pointer (string)
-- KEYS[4] the new version's Redis key (a list for the Redis store; any name otherwise)
-- KEYS[5] the copy's record of producer numbers (string)
-- ARGV[1] lease TTL (s)   ARGV[2] writer (node)     ARGV[3] writer's epoch
-- ARGV[4] new version name ('' to retire the copy)
-- ARGV[5] '0' skips the check (only the test build the nemesis checker must catch)
-- ARGV[6] key prefix      ARGV[7] member ('<workflow>:<key>')
-- ARGV[8] the record (JSON), '' for none
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
end
return {1, previous}
