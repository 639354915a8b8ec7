-- task_retry_link: links a task to the task that retries it (POST /tasks/{id}/retry,
-- api/retry.py), right after task_submit recorded that retry.
--
-- task_retry_link(
--   keys=[task_record],
--   args=[task_id, retry_id]
-- )
--
-- task_id: the retried task (task_record is its record); retry_id: the new task, whose record
-- names task_id in `retry_of`.
--
-- Returns the id the record is linked to after the call: retry_id, or the one it was linked to
-- before (a task is retried once: the link is written only if it has none), or '' when
-- task_record is gone (expired): nothing written.
--
-- Reads task_record (whether it exists; `retried_as`).
-- Writes task_record (`retried_as`, HSETNX) and, when it links, deletes K.payload .. task_id,
-- which its ending kept for this retry (lib.lua publish_record): the retry holds its own copy.
-- The copy of its message (K.message) is shared with its message's other tasks: it expires
-- by itself (lib.lua close_task).
if redis.call('EXISTS', KEYS[1]) == 0 then return '' end
if redis.call('HSETNX', KEYS[1], 'retried_as', ARGV[2]) == 1 then
  redis.call('DEL', K.payload .. ARGV[1])
  return ARGV[2]
end
return redis.call('HGET', KEYS[1], 'retried_as')
