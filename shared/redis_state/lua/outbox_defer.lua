-- outbox_defer: a consumer that may not send now (its origin has as many sends in flight as
-- allowed) gives a queued event back, its attempt uncounted.
--
-- outbox_defer(
--   keys=[event, due],
--   args=[event_id, ticket, due_at]
-- )
--
-- Returns 1, or 0 for a stale message (the event is not queued under this ticket).
--
-- Reads event (state, ticket).
-- Writes event (state pending) and due (due at due_at).
if redis.call('HGET', KEYS[1], 'state') ~= 'queued'
  or redis.call('HGET', KEYS[1], 'ticket') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'pending')
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
