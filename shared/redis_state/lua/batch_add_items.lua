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
-- Writes K.task .. '<batch_id>-<index>' (status queued, created_at, owner, batch, then its
-- fields; record_ttl), K.payload .. task id (record_ttl), and one LPUSH of the messages per
-- queue (less Redis time with the AOF on, which logs every write command). The queue
-- depth counters were counted up by batch_create.
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
local ttl, now, owner, batch = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local queues = cjson.decode(ARGV[6])
for _, item in ipairs(cjson.decode(ARGV[5])) do
  local task_id = batch .. '-' .. item[1]
  local key = K.task .. task_id
  redis.call('HSET', key, 'status', 'queued', 'created_at', now, 'owner', owner, 'batch', batch,
    unpack(item[3]))
  redis.call('EXPIRE', key, ttl)
  if item[4] > 0 then
    redis.call('SET', K.payload .. task_id, ARGV[6 + #queues + item[4]], 'EX', ttl)
  end
end
local messages = {}
for n, queue in ipairs(queues) do
  messages[queue] = messages[queue] or {}
  table.insert(messages[queue], ARGV[6 + n])
end
for queue, queued in pairs(messages) do redis.call('LPUSH', queue, unpack(queued)) end
return 1
