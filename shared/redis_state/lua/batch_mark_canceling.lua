-- batch_mark_canceling: DELETE /batches/{id}, before its queued items are canceled
-- (batch_cancel_items).
--
-- batch_mark_canceling(
--   keys=[batch],
--   args=[now]
-- )
--
-- Returns the batch's status before the call ('' when it does not exist).
--
-- Reads batch (its status).
-- Writes batch (status canceling, cancel_requested_at) when it was in_progress; the last item
-- to end then ends it as `canceled` (lib.lua end_batch).
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'canceling', 'cancel_requested_at', ARGV[1])
end
return status or ''
