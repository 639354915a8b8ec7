-- task_settle: ends a task that can no longer end by itself (api/store.py
-- ApiStore.read_and_settle): a queued task past its deadline (expired), a running one whose
-- worker was lost (failed).
--
-- task_settle(
--   keys=[task_record],
--   args=[expected_status, new_status, now, error, record_ttl, task_id]
-- )
--
-- Returns 1 (ended here) or 0 (its status is no longer expected_status: it moved on
-- meanwhile, nothing written).
--
-- Reads task_record (its status).
-- Writes the ending (lib.lua end_task): task_record, K.queued, K.batch counters, webhook
-- event, K.payload deleted (or kept for a retry: lib.lua publish_record), publish on
-- K.finished.
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
end_task(KEYS[1], ARGV[6], ARGV[1], ARGV[2], ARGV[3], ARGV[5], 'error', ARGV[4])
return 1
