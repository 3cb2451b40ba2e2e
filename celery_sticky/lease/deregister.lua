-- Remove a worker from the registry on a clean stop. Its leases become invalid
-- at once (their owner has no heartbeat), so the next publish claims elsewhere;
-- its owned set stays for whoever recovers its queue.
--
-- KEYS[1] workers zset    KEYS[2] worker info hash
-- ARGV[1] node name
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
