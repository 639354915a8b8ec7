-- outbox_claim: a webhook consumer takes one event to send it.
--
-- outbox_claim(
--   keys=[event, due],
--   args=[event_id, ticket, now, send_lease, output_interval, output_max_entries,
--         output_max_bytes]
-- )
--
-- output_*: a task.output event's pacing (shared/webhook_output.py): the least time between two
-- of a task's task.output events, and the most entries and data bytes one carries.
--
-- Returns the event's fields (state 'sending', the attempt counted) or {} for a stale message
-- (its ticket is not the current one, or the event is not queued): the duplicates that
-- at-least-once delivery makes are skipped instead of sent twice. A task.output event's first
-- claim reads its outputs in (lib.lua read_outputs): they are the stream's entries at send
-- time, the same on every retry.
--
-- Reads event (state, ticket, type); for a first task.output claim K.output .. task_id, the
-- task's stream K.stream .. task_id and its record's status (K.task .. task_id).
-- Writes event (ticket, attempts and round up, state sending; a task.output's outputs) and due
-- (due again after send_lease, so an event whose consumer died mid-send is sent later, with
-- the same id); for a first task.output claim K.output .. task_id (read up to where) and, when
-- a cap left entries out, the task's next task.output event (K.event .. its id, due).
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' or redis.call('HGET', KEYS[1], 'ticket') ~= ARGV[2] then return {} end
redis.call('HINCRBY', KEYS[1], 'ticket', 1)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HINCRBY', KEYS[1], 'round', 1)
redis.call('HSET', KEYS[1], 'state', 'sending')
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
if redis.call('HGET', KEYS[1], 'type') == 'task.output'
  and redis.call('HEXISTS', KEYS[1], 'last_event_id') == 0 then
  read_outputs(KEYS[1], ARGV[1], ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6]),
    tonumber(ARGV[7]))
end
return redis.call('HGETALL', KEYS[1])
