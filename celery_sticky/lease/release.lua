-- Release a lease, if it is still held by the expected owner ('' = whoever holds it)
-- under the expected epoch ('' = any).
--
-- KEYS[1] lease hash
-- ARGV[1] key prefix ('<prefix>:')   ARGV[2] owned-set member   ARGV[3] expected owner or ''
-- ARGV[4] expected epoch or ''
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
return 1
