-- outbox_claim: a webhook consumer takes one event to send it.
--
-- outbox_claim(
--   keys=[event, due],
--   args=[event_id, ticket, now, send_lease]
-- )
--
-- Returns the event's fields (state 'sending', the attempt counted) or {} for a stale message
-- (its ticket is not the current one, or the event is not queued): the duplicates that
-- at-least-once delivery makes are skipped instead of sent twice.
--
-- Reads event (state, ticket).
-- Writes event (ticket, attempts and round up, state sending) and due (due again after
-- send_lease, so an event whose consumer died mid-send is sent later, with the same id).
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' or redis.call('HGET', KEYS[1], 'ticket') ~= ARGV[2] then return {} end
redis.call('HINCRBY', KEYS[1], 'ticket', 1)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HINCRBY', KEYS[1], 'round', 1)
redis.call('HSET', KEYS[1], 'state', 'sending')
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
return redis.call('HGETALL', KEYS[1])
