-- Give messages a worker took back to the head of their queue: each one that is
-- still in the in-flight list leaves it and goes onto the queue's head (one already
-- acknowledged or restored is left alone, so nothing is duplicated).
--
-- Keyspace: as in restore_inflight.lua.
--   KEYS[1] <queue>                    the queue (its head is the right end)
--   KEYS[2] _sticky.inflight.<queue>   the worker's in-flight list of it
--   ARGV    the messages, exactly as taken, newest first (the oldest ends at the head)
--
-- Returns how many messages moved.
local moved = 0
for i = 1, #ARGV do
  if redis.call('LREM', KEYS[2], -1, ARGV[i]) > 0 then
    redis.call('RPUSH', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
return moved
