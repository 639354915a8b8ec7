-- batch_create: POST /batches, first in the MULTI that then adds the items (batch_add_items).
--
-- batch_create(
--   keys=[batch, idempotency_key_or_batch, queued_counter...],
--   args=[max_depth, idempotency_record, idempotency_ttl, batch_ttl, count..., field, value, ...]
-- )
--
-- idempotency_key_or_batch: the batch's idempotency key, or the batch key again when there is
-- none (then idempotency_record is ''). queued_counter...: K.queued .. queue of each class the
-- batch uses; count...: its number of items in each, in the same order. field, value, ...: the
-- batch hash (batch.py).
--
-- Returns 1 (created), 0 (a class would exceed max_depth: nothing written) or the idempotency
-- record held under the key (a replay: nothing written). batch_add_items then adds nothing,
-- as no batch was created.
--
-- Reads the idempotency key and the batch it holds, the counters.
-- Writes the counters (INCRBY count), batch (batch_ttl), the idempotency key
-- (idempotency_ttl) and K.open_batches (the console's batches in progress; lib.lua end_batch
-- takes it out).
local queues = #KEYS - 2
if ARGV[2] ~= '' then
  local held = redis.call('GET', KEYS[2])
  if held and redis.call('EXISTS', K.batch .. held_id(held)) == 1 then return held end
end
for i = 1, queues do
  if tonumber(redis.call('GET', KEYS[2 + i]) or '0') + tonumber(ARGV[4 + i]) > tonumber(ARGV[1])
  then
    return 0
  end
end
for i = 1, queues do redis.call('INCRBY', KEYS[2 + i], ARGV[4 + i]) end
for i = 5 + queues, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', K.open_batches, redis.call('HGET', KEYS[1], 'created_at') or '0',
  string.sub(KEYS[1], #K.batch + 1))
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3]) end
return 1
