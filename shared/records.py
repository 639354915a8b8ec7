"""The dispatcher's own task records in Redis, and the atomic transitions between states.

Celery's result backend is not used: an unknown id would read as PENDING, results would need one
subscription per task, and state changes could race. Instead each task is a hash
`dispatch:task:<id>`, every transition is a Lua script (one round trip, atomic against the API's
cancel and a redelivered copy), and every terminal transition publishes the id on one channel.
The API (asyncio) and the workers (sync) run the same scripts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from shared import fastjson
from shared.batches import BATCH_MOVE
from shared.models import TaskError, TaskStatus, TaskView
from shared.outbox import EMIT
from shared.priorities import Priority
from shared.queue_depth import LEAVE_QUEUE

TASK_KEY_PREFIX = "dispatch:task:"
FINISHED_CHANNEL = "dispatch:finished"
# Live prediction workers, scored by their last heartbeat (worker/heartbeat.py): /ready and the
# metrics count them with one ZCOUNT instead of SCANning a keyspace that holds every task record.
# A worker is live while its last beat is at most LIVE_BEATS heartbeat intervals old; entries
# older than STALE_BEATS intervals (a worker that died without leaving) are dropped by the others.
WORKERS_KEY = "dispatch:workers"
LIVE_BEATS = 3
STALE_BEATS = 30
LAST_FINISHED_KEY = "dispatch:last_finished"
TERMINAL = tuple(s.value for s in TaskStatus if s.terminal)
# A finished task's record is published whole unless its result is longer than this: then only
# its id (every API process receives every publish; the one waiting reads the record).
PUBLISH_INLINE_BYTES = 16 * 1024


# With emit_webhook (shared/outbox.py): a transition writes its webhook event atomically; with
# moved (batch_move of shared/batches.py, left_queue of shared/queue_depth.py) it keeps its
# batch's counters and its class's queue depth.
PUBLISH_RECORD = (
    EMIT
    + BATCH_MOVE
    + LEAVE_QUEUE
    + f"""
local function moved(key, old, new, now, channel)
  left_queue(key, old)
  batch_move(key, old, new, now, channel)
end

-- Publishes the task's whole record, so waiters need no read after the wake-up; a big result is
-- left out (the id alone), so each API process does not receive every large answer: the one
-- waiting for it reads it. Every caller ends the task, so this is also where its claim-checked
-- payload (shared/payloads.py) goes: the key is derived from the id rather than passed in KEYS,
-- which is fine on the single Redis used here.
local function publish_record(key, channel, task_id)
  redis.call('DEL', 'dispatch:payload:' .. task_id)
  if redis.call('HSTRLEN', key, 'result') > {PUBLISH_INLINE_BYTES} then
    redis.call('PUBLISH', channel, cjson.encode({{task_id}}))
  else
    redis.call('PUBLISH', channel, cjson.encode({{task_id, redis.call('HGETALL', key)}}))
  end
end
"""
)


def task_key(task_id: str) -> str:
    return TASK_KEY_PREFIX + task_id


# KEYS: none (each task's keys follow from its id). ARGV: max depth, record ttl, idempotency ttl,
# the tasks as JSON (each [task id, queue, [field, value, ...] of its record (strings), the ARGV
# index of its claim-checked payload or 0, its idempotency key or '', its idempotency record
# "<fingerprint>:<task id>" (api/idempotency.py)]), the messages as JSON ({queue: ARGV index}),
# then the messages and payloads.
# Returns one result per task: 1 (recorded), 0 (its class is at the depth limit: nothing written
# for it) or the record held under its idempotency key (a live task: nothing written for it).
# One group commit of the API (api/group_commit.py) is one call: per task, the depth check, the
# record, its payload and its idempotency key go in together, and each class's tasks share one
# message (pushed when at least one of them was recorded). A task of that message that was not
# recorded has no record: the worker's START finds it `missing` and skips it. Concurrent first
# requests with one idempotency key create exactly one task, in one call or in several.
SUBMIT_MANY = """
local max_depth, ttl, idempotency_ttl = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local results, recorded = {}, {}
for i, task in ipairs(cjson.decode(ARGV[4])) do
  local task_id, queue, fields, payload, idempotency = task[1], task[2], task[3], task[4], task[5]
  local result = 1
  if idempotency ~= '' then
    local held = redis.call('GET', idempotency)
    if held then
      local _, colon = string.find(held, ':', 1, true)
      if redis.call('EXISTS', 'dispatch:task:' .. string.sub(held, colon + 1)) == 1 then
        result = held
      end
    end
  end
  local counter = 'dispatch:queued:' .. queue
  if result == 1 and tonumber(redis.call('GET', counter) or '0') >= max_depth then result = 0 end
  if result == 1 then
    local key = 'dispatch:task:' .. task_id
    if payload > 0 then
      redis.call('SET', 'dispatch:payload:' .. task_id, ARGV[payload], 'EX', ttl)
    end
    redis.call('HSET', key, unpack(fields))
    redis.call('EXPIRE', key, ttl)
    redis.call('INCR', counter)
    if idempotency ~= '' then
      redis.call('SET', idempotency, task[6], 'EX', idempotency_ttl)
    end
    recorded[queue] = true
  end
  results[i] = result
end
for queue, index in pairs(cjson.decode(ARGV[5])) do
  if recorded[queue] then redis.call('LPUSH', queue, ARGV[index]) end
end
return results
"""

# Lua: one delivery of one task. Returns {verdict, deliveries}: 'run', a terminal status (a
# redelivered copy of a finished task), 'missing', or 'too_many'. A task past its deadline
# becomes 'expired' here, before TorchServe. `expired`, `overran`: the errors (JSON, without
# task_id) of a task that never started in time and of a redelivered one whose deadline passed.
START_TASK = (
    PUBLISH_RECORD
    + """
local function with_task_id(error, task_id)
  local body = cjson.decode(error)
  body['task_id'] = task_id
  return cjson.encode(body)
end

local function start_task(task_id, now, max_deliveries, ttl, channel, worker, expired, overran)
  local key = 'dispatch:task:' .. task_id
  local status = redis.call('HGET', key, 'status')
  if not status then return {'missing', 0} end
  if status ~= 'queued' and status ~= 'running' then return {status, 0} end
  local deliveries = redis.call('HINCRBY', key, 'deliveries', 1)
  if deliveries > tonumber(max_deliveries) then return {'too_many', deliveries} end
  if tonumber(now) > tonumber(redis.call('HGET', key, 'deadline')) then
    -- Never started: expired. Started by a worker that died: it ran out of time (overran).
    local new = 'expired'
    local error = expired
    if status == 'running' then new, error = 'failed', overran end
    redis.call('HSET', key, 'status', new, 'finished_at', now,
      'error', with_task_id(error, task_id))
    redis.call('EXPIRE', key, ttl)
    moved(key, status, new, now, channel)
    emit_webhook(key, task_id, new, now, ttl)
    publish_record(key, channel, task_id)
    return {'expired', deliveries}
  end
  redis.call('HSET', key, 'status', 'running', 'started_at', now, 'worker', worker)
  moved(key, status, 'running', now, channel)
  -- A redelivered copy restarts a running task: task.started was sent for its first start.
  if status == 'queued' then emit_webhook(key, task_id, 'running', now, ttl) end
  return {'run', deliveries}
end
"""
)

# KEYS: none. ARGV: now, max deliveries, ttl, channel, worker name, error of an expiry, error of
# a redelivered task whose deadline passed (both JSON without task_id), then the task ids.
# START for every task of one Celery message in one call; returns verdict, deliveries, ... in
# the tasks' order.
START_MANY = (
    START_TASK
    + """
local verdicts = {}
for i = 8, #ARGV do
  local verdict = start_task(ARGV[i], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
  table.insert(verdicts, verdict[1])
  table.insert(verdicts, verdict[2])
end
return verdicts
"""
)

# KEYS: LAST_FINISHED_KEY. ARGV: now, ttl, channel, the outcomes as JSON (each [task id, status,
# field ('result' or 'error'), the ARGV index of its value, [field, value, ...] more (e.g. the
# answer's content type)]), then the values.
# Only a live task finishes; a record that already ended keeps its first outcome. Returns 1 or 0
# per outcome. LAST_FINISHED_KEY lets /ready tell workers that complete work from workers that
# merely live. The values travel as arguments of their own: a large answer is not escaped into
# the JSON.
FINISH_MANY = (
    PUBLISH_RECORD
    + """
local now, ttl, channel = ARGV[1], ARGV[2], ARGV[3]
redis.call('SET', KEYS[1], now)
local ended = {}
for i, outcome in ipairs(cjson.decode(ARGV[4])) do
  local task_id, new = outcome[1], outcome[2]
  local key = 'dispatch:task:' .. task_id
  local status = redis.call('HGET', key, 'status')
  if status == 'queued' or status == 'running' then
    redis.call('HSET', key, 'status', new, 'finished_at', now, outcome[3], ARGV[outcome[4]],
      unpack(outcome[5]))
    redis.call('EXPIRE', key, ttl)
    moved(key, status, new, now, channel)
    emit_webhook(key, task_id, new, now, ttl)
    publish_record(key, channel, task_id)
    ended[i] = 1
  else
    ended[i] = 0
  end
end
return ended
"""
)

# KEYS: record. ARGV: now, ttl, channel, task id, error of a cancel.
# Returns the status after the call: 'canceled', 'cancel_requested' (running) or the terminal one.
CANCEL = (
    PUBLISH_RECORD
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1], 'error', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  moved(KEYS[1], 'queued', 'canceled', ARGV[1], ARGV[3])
  emit_webhook(KEYS[1], ARGV[4], 'canceled', ARGV[1], ARGV[2])
  publish_record(KEYS[1], ARGV[3], ARGV[4])
  return 'canceled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancel_requested'
end
return status
"""
)


# KEYS: record. ARGV: expected status, new status, now, error, ttl, channel, task id.
# Settles a task that outlived its bounds (see api/store.py) unless it moved on meanwhile.
SETTLE = (
    PUBLISH_RECORD
    + """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'error', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
moved(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[6])
emit_webhook(KEYS[1], ARGV[7], ARGV[2], ARGV[3], ARGV[5])
publish_record(KEYS[1], ARGV[6], ARGV[7])
return 1
"""
)


# KEYS: none. ARGV: now, ttl, channel, error of a cancel (its task_id left out), batch id, first
# index, last index. CANCEL for each queued item of a batch in the range; returns how many.
CANCEL_ITEMS = (
    PUBLISH_RECORD
    + """
local canceled = 0
for i = tonumber(ARGV[6]), tonumber(ARGV[7]) do
  local task_id = ARGV[5] .. '-' .. i
  local key = 'dispatch:task:' .. task_id
  if redis.call('HGET', key, 'status') == 'queued' then
    local error = cjson.decode(ARGV[4])
    error['task_id'] = task_id
    redis.call('HSET', key, 'status', 'canceled', 'finished_at', ARGV[1],
      'error', cjson.encode(error))
    redis.call('EXPIRE', key, ARGV[2])
    moved(key, 'queued', 'canceled', ARGV[1], ARGV[3])
    emit_webhook(key, task_id, 'canceled', ARGV[1], ARGV[2])
    publish_record(key, ARGV[3], task_id)
    canceled = canceled + 1
  end
end
return canceled
"""
)


def parse_published(message: str) -> tuple[str, dict[str, str] | None]:
    """(task id, record fields) from a FINISHED_CHANNEL message; None when the record was left
    out (a big result: read it)."""
    task_id, *flat = json.loads(message)
    if not flat:
        return task_id, None
    return task_id, dict(zip(flat[0][::2], flat[0][1::2], strict=True))


def published_task_id(message: str) -> str:
    """The task id alone, without parsing the record (most messages are for other processes)."""
    return message.split('"', 2)[1]


def _timestamp(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), UTC) if raw else None


def decode_record(task_id: str, fields: Mapping[str, str]) -> TaskView:
    """A task view from the hash as `HGETALL` returns it (decoded to str)."""
    error = fields.get("error")
    result = fields.get("result")
    created_at = datetime.fromtimestamp(float(fields["created_at"]), UTC)
    deadline = datetime.fromtimestamp(float(fields["deadline"]), UTC)
    return TaskView(
        task_id=task_id,
        status=TaskStatus(fields["status"]),
        model_name=fields["model_name"],
        model_version=fields.get("model_version") or None,
        created_at=created_at,
        started_at=_timestamp(fields.get("started_at")),
        finished_at=_timestamp(fields.get("finished_at")),
        deadline=deadline,
        deliveries=int(fields.get("deliveries", 0)),
        worker=fields.get("worker") or None,
        cancel_requested=fields.get("cancel_requested") == "1",
        priority=Priority(fields.get("priority") or Priority.default.value),
        batch_id=fields.get("batch") or None,
        custom_id=fields.get("custom_id"),
        prediction_value=fastjson.loads(result) if result is not None else None,
        prediction_content_type=fields.get("result_type"),
        error=TaskError.model_validate_json(error) if error else None,
    )
