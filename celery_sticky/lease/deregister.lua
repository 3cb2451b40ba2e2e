-- Mark a worker dead now (a drain, or a clean stop): score 0 in the registry.
-- Its keys stay pending (routed to its queue) until its queue was moved on and
-- it is marked reaped; then the next claim takes them over. The entry itself is
-- forgotten later, by whoever reaps it.
--
-- KEYS[1] workers zset    KEYS[2] worker info hash
-- ARGV[1] node name
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
  redis.call('HSET', KEYS[2], 'draining', '1')
end
return 1
