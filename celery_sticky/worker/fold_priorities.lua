-- Move the messages kombu put in a queue's priority sub-lists onto the queue itself,
-- at its tail: queues taken with BLMOVE ignore priorities (BLMOVE takes from one
-- list; a key's order matters more than a message's priority).
--
-- Keyspace: the broker's Redis (see restore_inflight.lua).
--   KEYS[1]    <queue>                 the queue (tail: the left end)
--   KEYS[2..n] <queue>\x06\x16<n>      kombu's priority sub-lists of it, highest
--                                      priority first; each holds its oldest at the right
--
-- Returns how many messages moved.
local moved = 0
for i = 2, #KEYS do
  while redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'LEFT') do
    moved = moved + 1
  end
end
return moved
