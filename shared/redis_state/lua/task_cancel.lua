-- task_cancel: DELETE /tasks/{id}.
--
-- task_cancel(
--   keys=[task_record],
--   args=[now, record_ttl, task_id, canceled_error, running_error]
-- )
--
-- canceled_error: the error body of the cancel (JSON with its task_id); running_error: the one
-- of a running streamed task.
--
-- Returns the status after the call: 'canceled' (it was queued, or running with a stream: ended
-- here; a streamed task's worker stops its call at its next chunk, which its ended stream
-- refuses), 'cancel_requested' (running, not streamed: flagged, the worker still stores its
-- outcome), the terminal status it already had, or 'missing'.
--
-- Reads task_record (its status).
-- Writes task_record (`cancel_requested`, or its ending through lib.lua end_task: K.queued
-- down, K.batch counters, webhook event, K.stream's done, K.payload deleted (or kept for a
-- retry: lib.lua publish_record), publish on K.finished).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  cancel_queued(KEYS[1], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
  return 'canceled'
end
if status == 'running' and redis.call('HGET', KEYS[1], 'stream') == '1' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  end_task(KEYS[1], ARGV[3], 'running', 'canceled', ARGV[1], ARGV[2], 'error', ARGV[5])
  return 'canceled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancel_requested'
end
return status
