-- batch_cancel_items: cancels the queued items of a batch in one range of indices.
--
-- batch_cancel_items(
--   keys=[],
--   args=[now, record_ttl, canceled_error, batch_id, first_index, last_index]
-- )
--
-- canceled_error: the error body of the cancel (JSON without task_id). Items that are not
-- queued are left alone (running ones finish).
--
-- Returns how many items were canceled.
--
-- Reads each item's record (its status).
-- Writes each queued item's ending through lib.lua cancel_queued, as task_cancel does:
-- K.task .. '<batch_id>-<index>', K.queued down, K.batch counters (the last one ends the
-- batch), webhook events, K.payload deleted (or kept for a retry: lib.lua publish_record),
-- publish on K.finished.
local canceled = 0
for i = tonumber(ARGV[5]), tonumber(ARGV[6]) do
  local task_id = ARGV[4] .. '-' .. i
  local key = K.task .. task_id
  if redis.call('HGET', key, 'status') == 'queued' then
    cancel_queued(key, task_id, ARGV[1], ARGV[2], with_task_id(ARGV[3], task_id))
    canceled = canceled + 1
  end
end
return canceled
