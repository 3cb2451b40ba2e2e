-- Put a worker's in-flight messages of a queue back at the queue's head, in the order
-- they were delivered, atomically (see celery_sticky/worker/delivery.py).
--
-- Keyspace: the broker's Redis (the database of broker_url), beside kombu's lists.
--   KEYS[1] <queue>                    a kombu list, a direct or a shared queue:
--                                      producers LPUSH (the tail is the left end),
--                                      consumers take from the right end (the head)
--   KEYS[2] _sticky.inflight.<queue>   what a worker took with
--                                      BLMOVE <queue> <in-flight> RIGHT LEFT and has not
--                                      acknowledged yet: the newest at the left end.
--                                      A shared queue has one list per worker,
--                                      _sticky.inflight.<queue>|<node>, and the set
--                                      _sticky.taken.<node> names the node's queues
--
-- The in-flight list's newest message goes onto the queue's head first, its oldest
-- last: the oldest ends rightmost and is taken first again, before anything newer.
-- Returns how many messages moved.
local moved = 0
while redis.call('LMOVE', KEYS[2], KEYS[1], 'LEFT', 'RIGHT') do
  moved = moved + 1
end
return moved
