-- task_cancel: DELETE /tasks/{id}.
--
-- task_cancel(
--   keys=[task_record],
--   args=[now, record_ttl, task_id, canceled_error]
-- )
--
-- canceled_error: the error body of the cancel (JSON with its task_id).
--
-- Returns the status after the call: 'canceled' (it was queued: ended here),
-- 'cancel_requested' (running: flagged, the worker still stores its outcome), the terminal
-- status it already had, or 'missing'.
--
-- Reads task_record (its status).
-- Writes task_record (`cancel_requested`, or its ending through lib.lua cancel_queued:
-- K.queued down, K.batch counters, webhook event, K.payload deleted, publish on K.finished).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  cancel_queued(KEYS[1], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
  return 'canceled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancel_requested'
end
return status
