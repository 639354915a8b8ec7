-- task_submit: records one group commit of the API's submits (api/group_commit.py).
--
-- task_submit(
--   keys=[],
--   args=[max_depth, record_ttl, idempotency_ttl, tasks_json, messages_json,
--         message..., payload...]
-- )
--
-- tasks_json: one entry per task, [task_id, queue, fields, payload, idempotency_key,
--   idempotency_record]: `fields` are field, value, ... of its record (record.py), `payload`
--   the ARGV index of its claim-checked payload (0: none), `idempotency_key` '' for none.
-- messages_json: {queue: ARGV index of the Celery message carrying that queue's tasks}.
--
-- Returns one result per task, in order: 1 (recorded), 0 (its class has max_depth tasks
-- queued: nothing written for it) or the idempotency record held under its key (a live task:
-- nothing written for it).
--
-- Reads: K.queued .. queue, the idempotency keys, the record of a held task.
-- Writes, per recorded task: K.task .. task_id (record_ttl; `message` names its message),
--   K.payload .. task_id (record_ttl), K.queued .. queue (INCR), its idempotency key
--   (idempotency_ttl), K.open (ZADD, scored by its created_at). Per queue with at least one
--   recorded task: LPUSH of its message onto the Celery queue `queue`, and its copy
--   K.message .. <its first task's id, the message's own> (body, open: its recorded tasks,
--   secret: '1' when one of them has `credentials`, so that it is never kept past them;
--   record_ttl) for worker/reconciler.py, should kombu lose it. The console's figures
--   (K.figures: submitted and refused per class, at the first task's created_at) and the list
--   of recent tasks (K.recent, the newest RECENT_LIMIT).
--
-- Per task, the depth check, the record, its payload and its idempotency key go in together.
-- A task of a pushed message that was not recorded has no record: task_start finds it
-- `missing` and skips it. Concurrent first requests with one idempotency key create exactly
-- one task, in one call or in several.
local max_depth, ttl, idempotency_ttl = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local results, recorded, first, submitted, refused, now = {}, {}, {}, {}, {}, nil
local secret = {}
for i, task in ipairs(cjson.decode(ARGV[4])) do
  local task_id, queue, fields, payload, idempotency = task[1], task[2], task[3], task[4], task[5]
  -- A message is named after its first task (shared/celery_app.py encode_message).
  first[queue] = first[queue] or task_id
  local created_at, class = nil, 'default'
  for f = 1, #fields, 2 do
    if fields[f] == 'created_at' then created_at = fields[f + 1] end
    if fields[f] == 'priority' then class = fields[f + 1] end
    if fields[f] == 'credentials' then secret[queue] = true end
  end
  now = now or created_at
  local result = 1
  if idempotency ~= '' then
    local held = redis.call('GET', idempotency)
    if held and redis.call('EXISTS', K.task .. held_id(held)) == 1 then result = held end
  end
  local counter = K.queued .. queue
  if result == 1 and tonumber(redis.call('GET', counter) or '0') >= max_depth then
    result = 0
    refused[class] = (refused[class] or 0) + 1
  end
  if result == 1 then
    local key = K.task .. task_id
    if payload > 0 then redis.call('SET', K.payload .. task_id, ARGV[payload], 'EX', ttl) end
    redis.call('HSET', key, 'message', first[queue], unpack(fields))
    redis.call('EXPIRE', key, ttl)
    redis.call('INCR', counter)
    if idempotency ~= '' then redis.call('SET', idempotency, task[6], 'EX', idempotency_ttl) end
    if created_at then redis.call('ZADD', K.open, created_at, task_id) end
    redis.call('LPUSH', K.recent, task_id)
    submitted[class] = (submitted[class] or 0) + 1
    recorded[queue] = (recorded[queue] or 0) + 1
  end
  results[i] = result
end
for queue, index in pairs(cjson.decode(ARGV[5])) do
  if recorded[queue] then
    redis.call('LPUSH', queue, ARGV[index])
    local copy = K.message .. first[queue]
    redis.call('HSET', copy, 'body', ARGV[index], 'open', recorded[queue])
    if secret[queue] then redis.call('HSET', copy, 'secret', '1') end
    redis.call('EXPIRE', copy, ttl)
  end
end
if now then
  for class, n in pairs(submitted) do count_figure(now, 'submitted:' .. class, n) end
  for class, n in pairs(refused) do count_figure(now, 'refused:' .. class, n) end
end
if next(submitted) then redis.call('LTRIM', K.recent, 0, RECENT_LIMIT - 1) end
return results
