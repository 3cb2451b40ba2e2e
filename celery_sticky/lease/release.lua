-- Release a lease, if it is still held by the expected owner ('' = whoever holds it)
-- under the expected epoch ('' = any).
--
-- With ARGV[5], the workflow ended: the key's record of applied producer numbers
-- (JSON) is kept at KEYS[2] for ARGV[6] seconds, in the same step as the release,
-- so the key's next owner knows where each producer's numbers stand (a paused
-- owner whose lease was taken is refused here: its record never lands).
--
-- KEYS[1] lease hash      KEYS[2] ended-record string
-- ARGV[1] key prefix ('<prefix>:')   ARGV[2] owned-set member   ARGV[3] expected owner or ''
-- ARGV[4] expected epoch or ''       ARGV[5] record (JSON) or ''  ARGV[6] its TTL (s)
--
-- Returns 1 when released, 0 when there was no such lease or another owner holds it.
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or (ARGV[3] ~= '' and owner ~= ARGV[3]) then
  return 0
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[4] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SREM', ARGV[1] .. 'owned:' .. owner, ARGV[2])
if ARGV[5] and ARGV[5] ~= '' then
  redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[6])
end
return 1
