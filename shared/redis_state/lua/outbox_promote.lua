-- outbox_promote: the relay's step (worker/webhooks.py), moving due webhook events onto the
-- Celery queue `webhooks`.
--
-- outbox_promote(
--   keys=[due],
--   args=[now, queue_lease, limit]
-- )
--
-- Returns id, ticket, id, ticket, ...: at most `limit` events due by `now`, to send a message
-- for each. Each is leased (due again `queue_lease` seconds later) so a message lost on the way
-- is promoted again. An event promoted while its message still waits keeps its ticket:
-- whichever copy comes first is sent, not neither.
--
-- Reads due and each K.event .. id.
-- Writes K.event .. id (state queued, a new ticket unless it was queued already) and due (the
-- lease); drops from due the ids whose event expired.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local event = K.event .. id
  local state = redis.call('HGET', event, 'state')
  if not state then
    redis.call('ZREM', KEYS[1], id)
  else
    local ticket = redis.call('HGET', event, 'ticket')
    if state ~= 'queued' then
      ticket = redis.call('HINCRBY', event, 'ticket', 1)
      redis.call('HSET', event, 'state', 'queued')
    end
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    table.insert(out, id)
    table.insert(out, tostring(ticket))
  end
end
return out
