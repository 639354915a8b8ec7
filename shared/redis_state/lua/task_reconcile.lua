-- task_reconcile: pushes a fresh message for one open task whose message kombu lost
-- (worker/reconciler.py found it in no queue and in no worker's unacked messages, twice).
--
-- task_reconcile(
--   keys=[task_record],
--   args=[task_id, seen, live_since, message]
-- )
--
-- seen: "<status>:<deliveries>:<reconciled>" of the record as the reconciler found it in both
-- rounds; live_since: the oldest heartbeat (epoch seconds) of a live worker; message: a Celery
-- message carrying this one task (shared/celery_app.py encode_message).
--
-- Returns 'requeued' (pushed, counted), 'changed' (the record moved on since it was seen: a
-- worker started it, it ended, or another round pushed it already), 'live' (running on a
-- worker that beats again), a terminal status or 'missing' (it left K.open here).
--
-- Reads task_record, K.workers (its worker's last beat).
-- Writes, when requeued: RPUSH of message onto its class's queue (QUEUE_OF[priority]; the
-- tail is where kombu's BRPOP takes the next message, and where kombu puts back a dead worker's
-- message too: it waited long enough), `reconciled` (HINCRBY) on task_record. The status stays
-- as it was, so K.queued stays right: a queued task is counted already, a running one is not,
-- and task_start moves either to running (deliveries + 1) as for any redelivered copy. When
-- ended or missing: ZREM of task_id from K.open.
local f = redis.call('HMGET', KEYS[1], 'status', 'deliveries', 'reconciled', 'priority', 'worker')
local status = f[1]
if not status then
  redis.call('ZREM', K.open, ARGV[1])
  return 'missing'
end
if status ~= 'queued' and status ~= 'running' then
  redis.call('ZREM', K.open, ARGV[1])
  return status
end
if status .. ':' .. (f[2] or '0') .. ':' .. (f[3] or '0') ~= ARGV[2] then return 'changed' end
if status == 'running' then
  local beat = redis.call('ZSCORE', K.workers, f[5] or '')
  if beat and tonumber(beat) >= tonumber(ARGV[3]) then return 'live' end
end
redis.call('RPUSH', QUEUE_OF[f[4]], ARGV[4])
redis.call('HINCRBY', KEYS[1], 'reconciled', 1)
return 'requeued'
