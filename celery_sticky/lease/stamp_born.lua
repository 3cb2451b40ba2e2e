-- Stamp when this store's data began, unless it is stamped already (see lease.lua's
-- keyspace and claim.lua's claim grace). A worker does it as it starts, so the grace
-- of a new store is mostly over by the time it takes tasks.
--
-- KEYS[1] '<prefix>born'
-- Returns the stamp (server time in s).
local t = redis.call('TIME')
redis.call('SET', KEYS[1], string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000), 'NX')
return redis.call('GET', KEYS[1])
