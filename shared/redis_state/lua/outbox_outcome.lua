-- outbox_outcome: a consumer records one send attempt of a claimed event.
--
-- outbox_outcome(
--   keys=[event, due, delivery_log],
--   args=[event_id, ticket, attempt_json, next_state, due_at, log_ttl, log_limit]
-- )
--
-- ticket: the event's ticket after the claim. next_state: 'pending' (retry at due_at) or a
-- final one (delivered, stopped, failed).
--
-- Returns 1, or 0 when the claim is no longer the current one (a consumer that outlived its
-- lease does not override what happened since): the attempt is logged all the same.
--
-- A task.output event stopped (410, or the allow-list refused it) stops the task's later
-- task.output events too (the receiver said it wants no more of them; its other events are
-- sent as before): K.output .. task_id gets `stopped`, which stream_append and outbox_claim
-- read.
--
-- Reads event (state, ticket; type and task_id when stopped).
-- Writes delivery_log (the attempt appended, the newest log_limit kept, log_ttl), event
-- (state) and due (rescheduled at due_at, or removed when final); K.output .. task_id
-- (stopped) for a stopped task.output.
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[7]), -1)
redis.call('EXPIRE', KEYS[3], ARGV[6])
if redis.call('HGET', KEYS[1], 'state') ~= 'sending'
  or redis.call('HGET', KEYS[1], 'ticket') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[4])
if ARGV[4] == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if ARGV[4] == 'stopped' then
  local event = redis.call('HMGET', KEYS[1], 'type', 'task_id')
  local okey = K.output .. (event[2] or '')
  if event[1] == 'task.output' and redis.call('EXISTS', okey) == 1 then
    redis.call('HSET', okey, 'stopped', 1)  -- an existing key: it keeps its TTL
  end
end
return 1
