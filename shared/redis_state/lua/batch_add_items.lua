-- batch_add_items: records a slice of a batch's items and pushes their messages, after
-- batch_create in the same MULTI.
--
-- batch_add_items(
--   keys=[batch],
--   args=[record_ttl, now, owner, batch_id, items_json, queues_json, message..., payload...]
-- )
--
-- items_json: one entry per item, [index, queue, fields, payload]: `fields` are field, value,
-- ... of its record beyond what every item shares (record.py), `payload` the number of its
-- claim-checked payload among this call's payloads (0: none). queues_json: the queue of each
-- message, in order. One JSON argument instead of a dozen per item: packing a dozen arguments
-- per item of a 10,000-item batch cost the API more than everything else in it.
--
-- Returns 1, or 0 when batch is not `in_progress` (batch_create created nothing): nothing
-- written.
--
-- Reads batch (its status).
-- Writes K.task .. '<batch_id>-<index>' (status queued, created_at, owner, batch, message,
-- then its fields; record_ttl), K.payload .. task id (record_ttl), K.open (ZADD, scored by
-- now), one LPUSH of the messages per queue (less Redis time with the AOF on, which logs every
-- write command), and each message's copy K.message .. <its first item's id> (body, open: its
-- items, secret: '1' when one of them has `credentials`; record_ttl) for worker/reconciler.py, should kombu lose it; the console's figures
-- (K.figures: submitted per class) and its list of recent tasks (K.recent). The queue depth
-- counters were counted up by batch_create.
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
local ttl, now, owner, batch = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local queues = cjson.decode(ARGV[6])
-- A message is named after its first item (shared/celery_app.py encode_messages: the envelope's
-- first `"id": "` is its headers' id, as its body is base64), and carries the items of its
-- queue from that one up to the next message's first: messages and items come in order.
local starts, current, open, members, recent, submitted = {}, {}, {}, {}, {}, {}
local secret = {}
for n = 1, #queues do
  local message = ARGV[6 + n]
  local _, at = string.find(message, '"id": "', 1, true)
  if at then starts[string.sub(message, at + 1, string.find(message, '"', at + 1, true) - 1)] = n end
end
for _, item in ipairs(cjson.decode(ARGV[5])) do
  local task_id = batch .. '-' .. item[1]
  local key = K.task .. task_id
  if starts[task_id] then current[item[2]] = task_id end
  local message = current[item[2]] or ''
  open[message] = (open[message] or 0) + 1
  redis.call('HSET', key, 'status', 'queued', 'created_at', now, 'owner', owner, 'batch', batch,
    'message', message, unpack(item[3]))
  redis.call('EXPIRE', key, ttl)
  if item[4] > 0 then
    redis.call('SET', K.payload .. task_id, ARGV[6 + #queues + item[4]], 'EX', ttl)
  end
  table.insert(members, now)
  table.insert(members, task_id)
  table.insert(recent, task_id)
  for f = 1, #item[3], 2 do
    if item[3][f] == 'credentials' then secret[message] = true end
    if item[3][f] == 'priority' then
      submitted[item[3][f + 1]] = (submitted[item[3][f + 1]] or 0) + 1
    end
  end
  if #members >= 2000 then
    redis.call('ZADD', K.open, unpack(members))
    members = {}
  end
end
if #members > 0 then redis.call('ZADD', K.open, unpack(members)) end
for class, n in pairs(submitted) do count_figure(now, 'submitted:' .. class, n) end
-- The newest RECENT_LIMIT items only: a 10,000-item batch pushes no more than the list keeps.
for i = math.max(1, #recent - RECENT_LIMIT + 1), #recent do
  redis.call('LPUSH', K.recent, recent[i])
end
if #recent > 0 then redis.call('LTRIM', K.recent, 0, RECENT_LIMIT - 1) end
for id, n in pairs(starts) do
  if open[id] then
    local copy = K.message .. id
    redis.call('HSET', copy, 'body', ARGV[6 + n], 'open', open[id])
    if secret[id] then redis.call('HSET', copy, 'secret', '1') end
    redis.call('EXPIRE', copy, ttl)
  end
end
local messages = {}
for n, queue in ipairs(queues) do
  messages[queue] = messages[queue] or {}
  table.insert(messages[queue], ARGV[6 + n])
end
for queue, queued in pairs(messages) do redis.call('LPUSH', queue, unpack(queued)) end
return 1
