-- task_finish: stores the outcomes of tasks the worker ran.
--
-- task_finish(
--   keys=[last_finished],
--   args=[now, record_ttl, outcomes_json, value...]
-- )
--
-- outcomes_json: one entry per task, [task_id, status, field, value_index, more]: the terminal
-- status, the field of its value ('result' or 'error'), the ARGV index of that value, and more
-- field, value, ... (e.g. the answer's `result_type`). The values travel as arguments of their
-- own: a large answer is not escaped into the JSON.
--
-- Returns 1 or 0 per outcome, in order: only a live (queued or running) task ends; a record
-- that already ended keeps its first outcome (0).
--
-- Reads each task's record (its status).
-- Writes last_finished (now: /ready tells workers that complete work from workers that merely
-- live) and each ending (lib.lua end_task): K.task .. task_id, K.queued, K.batch counters,
-- webhook event (K.event, K.due), K.payload deleted (or, with K.message, kept for a retry:
-- lib.lua publish_record, close_task), publish on K.finished.
local now, ttl = ARGV[1], ARGV[2]
redis.call('SET', KEYS[1], now)
local ended = {}
for i, outcome in ipairs(cjson.decode(ARGV[3])) do
  local task_id, new = outcome[1], outcome[2]
  local key = K.task .. task_id
  local status = redis.call('HGET', key, 'status')
  if status == 'queued' or status == 'running' then
    end_task(key, task_id, status, new, now, ttl, outcome[3], ARGV[outcome[4]], unpack(outcome[5]))
    ended[i] = 1
  else
    ended[i] = 0
  end
end
return ended
