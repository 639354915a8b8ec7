-- outbox_retry: POST /tasks/{id}/deliveries/retry, sending a task's latest event again now.
--
-- outbox_retry(
--   keys=[event, due],
--   args=[event_id, now]
-- )
--
-- Returns 1, or 0 when the event does not exist (expired).
--
-- Reads event (its state).
-- Writes event (a new ticket, state pending, round 0: a fresh budget of attempts) and due
-- (due now). A send in flight keeps its log entry but no longer decides the schedule.
if not redis.call('HGET', KEYS[1], 'state') then return 0 end
redis.call('HINCRBY', KEYS[1], 'ticket', 1)
redis.call('HSET', KEYS[1], 'state', 'pending', 'round', 0)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
