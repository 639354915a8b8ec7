-- task_start: one delivery of the tasks of one Celery message, before the worker runs them.
--
-- task_start(
--   keys=[],
--   args=[now, max_deliveries, record_ttl, worker, expired_error, overran_error, task_id...]
-- )
--
-- expired_error, overran_error: the error bodies (JSON without task_id) of a task that never
-- started in time and of a redelivered one whose deadline passed while its worker was lost.
--
-- Returns verdict, deliveries, verdict, deliveries, ... in the tasks' order. Verdicts: 'run'
-- (the record is now `running`), 'missing' (no record), a terminal status (a redelivered copy
-- of a task that ended: nothing written), 'too_many' (delivered more than max_deliveries times:
-- the worker fails it), 'expired' (past its deadline: ended here, before TorchServe).
--
-- Reads K.task .. task_id.
-- Writes K.task .. task_id (deliveries, status, started_at, worker, and `starts`: the log of its
-- first DELIVERY_LOG_LIMIT deliveries that ran, "<now> <worker>" a line; or its ending); a task
-- leaving `queued` counts down K.queued; an ending, or a first start, writes its webhook event
-- (K.event, K.due), an ending deletes K.payload .. task_id (or keeps it for a retry) and
-- publishes on K.finished; batch
-- items keep their K.batch counters (lib.lua); K.running counts running tasks; the console's
-- figures (K.figures) get a first start's queue wait and every ending.
local function start_task(task_id, now, max_deliveries, ttl, worker, expired, overran)
  local key = K.task .. task_id
  local status = redis.call('HGET', key, 'status')
  if not status then return {'missing', 0} end
  if status ~= 'queued' and status ~= 'running' then return {status, 0} end
  local deliveries = redis.call('HINCRBY', key, 'deliveries', 1)
  if deliveries > tonumber(max_deliveries) then return {'too_many', deliveries} end
  if tonumber(now) > tonumber(redis.call('HGET', key, 'deadline')) then
    -- Never started: expired. Started by a worker that died: it ran out of time (overran).
    local new, error = 'expired', expired
    if status == 'running' then new, error = 'failed', overran end
    end_task(key, task_id, status, new, now, ttl, 'error', with_task_id(error, task_id))
    return {'expired', deliveries}
  end
  redis.call('HSET', key, 'status', 'running', 'started_at', now, 'worker', worker)
  if deliveries <= DELIVERY_LOG_LIMIT then
    local entry, log = now .. ' ' .. worker, redis.call('HGET', key, 'starts')
    redis.call('HSET', key, 'starts', log and (log .. '\n' .. entry) or entry)
  end
  moved(key, status, 'running', now)
  -- A redelivered copy restarts a running task: task.started was sent for its first start.
  if status == 'queued' then
    emit_webhook(key, task_id, 'running', now, ttl)
    local f = redis.call('HMGET', key, 'priority', 'created_at')
    count_duration(now, 'wait:' .. f[1], tonumber(now) - tonumber(f[2]))
  end
  return {'run', deliveries}
end

local verdicts = {}
for i = 7, #ARGV do
  local verdict = start_task(ARGV[i], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
  table.insert(verdicts, verdict[1])
  table.insert(verdicts, verdict[2])
end
return verdicts
