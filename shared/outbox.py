"""The webhook outbox in Redis: events written with the task's transition, and their schedule.

A transition script (shared/records.py) that moves a task with a `webhook` into a subscribed
state calls `emit_webhook` (EMIT below): in the same atomic script it writes the event (its
webhook-id, type, time, URL and a snapshot of the task record) and adds it to the sorted set
`dispatch:webhooks:due`, scored by when it is due. So an event exists exactly when its transition
happened: no crash between "state changed" and "event queued" can lose it.

The due set is the durable schedule; the Celery queue `webhooks` only carries "send this now".
The relay in each webhook consumer (worker/webhooks.py) moves due events onto that queue
(PROMOTE), a consumer CLAIMs one, sends it, and records the OUTCOME (done, or due again later).
Every step leaves the event in the due set with a lease score, so an event whose consumer died
(SIGKILL mid-send, a prefetched message lost) comes due again and is sent later, with the same
webhook-id. Long retry delays are scores in this set, never Celery ETAs: a message held for hours
by a worker would be redelivered by the broker's visibility timeout long before its ETA.

Messages carry the event's `ticket`; CLAIM accepts only the current one and moves it on, so the
duplicates that at-least-once delivery makes (a re-promoted event, a restored unacked message)
are skipped instead of sent twice.
"""

from __future__ import annotations

EVENT_KEY_PREFIX = "dispatch:webhook:event:"
LOG_KEY_PREFIX = "dispatch:webhook:log:"
DUE_KEY = "dispatch:webhooks:due"
# Events (and delivery logs) outlive RESULT_TTL when that is shorter than this: a retry schedule
# of hours must not lose its event. Settings keep the schedule within it.
MIN_EVENT_TTL = 3 * 86_400
# Entries of a task's delivery log kept (the newest).
LOG_LIMIT = 200


def event_key(event_id: str) -> str:
    return EVENT_KEY_PREFIX + event_id


def log_key(task_id: str) -> str:
    return LOG_KEY_PREFIX + task_id


# Lua, prepended to the transition scripts. `status`: the task's new status. The event id is
# derived from the task id and the event type: one task emits each type at most once (START
# emits task.started only for a queued task), so it is unique without a random source (which
# Redis scripts do not have) and stable for every retry of that event.
EMIT = f"""
local function emit_webhook(key, task_id, status, now, ttl)
  local hook = redis.call('HMGET', key, 'webhook', 'webhook_events')
  if not hook[1] then return end
  local kind = status
  if status == 'running' then kind = 'started' end
  if not string.find(',' .. (hook[2] or '') .. ',', ',task.' .. kind .. ',', 1, true) then
    return
  end
  local id = 'msg_' .. (string.gsub(task_id, '-', '')) .. '_' .. kind
  local event = '{EVENT_KEY_PREFIX}' .. id
  redis.call('HSET', key, 'webhook_event', id)
  redis.call('HSET', event, 'task_id', task_id, 'type', 'task.' .. kind, 'at', now,
    'url', hook[1], 'record', cjson.encode(redis.call('HGETALL', key)), 'state', 'pending',
    'attempts', 0, 'round', 0, 'ticket', 0)
  redis.call('EXPIRE', event, math.max(tonumber(ttl), {MIN_EVENT_TTL}))
  redis.call('ZADD', '{DUE_KEY}', now, id)
end
"""

# KEYS: due set. ARGV: now, queue lease (s), limit.
# Returns {id, ticket, id, ticket, ...}: the events to put on the queue now. Each is leased (due
# again after the lease) so a message lost on the way is promoted again. An event promoted while
# its message still waits keeps its ticket: whichever copy comes first is sent, not neither.
PROMOTE = f"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {{}}
for _, id in ipairs(ids) do
  local event = '{EVENT_KEY_PREFIX}' .. id
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
"""

# KEYS: event, due set. ARGV: event id, ticket, now, send lease (s).
# Returns the event's fields (state 'sending', attempts counted) or {} for a stale message.
CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' or redis.call('HGET', KEYS[1], 'ticket') ~= ARGV[2] then return {} end
redis.call('HINCRBY', KEYS[1], 'ticket', 1)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HINCRBY', KEYS[1], 'round', 1)
redis.call('HSET', KEYS[1], 'state', 'sending')
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: event, due set, delivery log. ARGV: event id, ticket after the claim, attempt (JSON),
# next state ('pending' or a final one), due time of the next attempt, log ttl, log limit.
# The attempt is always logged; the schedule changes only if the claim is still the current one
# (a consumer that outlived its lease does not override what happened since).
OUTCOME = """
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
return 1
"""

# KEYS: event, due set. ARGV: event id, now. Sends the event again now, with a fresh budget of
# attempts; a send in flight keeps its log entry but no longer decides the schedule.
RETRY = """
if not redis.call('HGET', KEYS[1], 'state') then return 0 end
redis.call('HINCRBY', KEYS[1], 'ticket', 1)
redis.call('HSET', KEYS[1], 'state', 'pending', 'round', 0)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: event, due set. ARGV: event id, ticket, due time. A consumer that may not send now (its
# origin has as many sends in flight as allowed) gives a queued event back, attempt uncounted.
DEFER = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued'
  or redis.call('HGET', KEYS[1], 'ticket') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'pending')
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""
