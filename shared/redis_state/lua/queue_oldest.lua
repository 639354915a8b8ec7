-- queue_oldest: when the oldest message waiting in each Celery queue was accepted (GET /status).
--
-- queue_oldest(
--   keys=[queue...],
--   args=[]
-- )
--
-- A queue is LPUSHed and BRPOPed, so its oldest message is its last element. A message is named
-- after its first task (shared/celery_app.py: the envelope's first `"id": "` is its headers'
-- id, as its body is base64), whose record holds created_at. Done here rather than in the API
-- so a large message never crosses the network just to read its name.
--
-- Returns, per queue in order, the created_at of its oldest message's first task ('' when the
-- queue is empty or that record is gone: a task canceled or expired while still in its queue
-- may leave its message behind; the worker skips it).
--
-- Reads each queue's last element and one record per queue.
-- Writes nothing.
local oldest = {}
for i, queue in ipairs(KEYS) do
  oldest[i] = ''
  local message = redis.call('LINDEX', queue, -1)
  if message then
    local _, at = string.find(message, '"id": "', 1, true)
    if at then
      local task_id = string.sub(message, at + 1, string.find(message, '"', at + 1, true) - 1)
      oldest[i] = redis.call('HGET', K.task .. task_id, 'created_at') or ''
    end
  end
end
return oldest
