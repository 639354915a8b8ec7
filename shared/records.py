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

from shared.batches import BATCH_MOVE
from shared.models import TaskError, TaskStatus, TaskView
from shared.outbox import EMIT
from shared.priorities import Priority

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


# With emit_webhook (shared/outbox.py): a transition writes its webhook event atomically; with
# batch_move (shared/batches.py) it keeps its batch's counters.
PUBLISH_RECORD = (
    EMIT
    + BATCH_MOVE
    + """
-- Publishes the task's whole record, so waiters need no read after the wake-up. Every caller ends
-- the task, so this is also where its claim-checked payload (shared/payloads.py) goes: the key is
-- derived from the id rather than passed in KEYS, which is fine on the single Redis used here.
local function publish_record(key, channel, task_id)
  redis.call('DEL', 'dispatch:payload:' .. task_id)
  redis.call('PUBLISH', channel, cjson.encode({task_id, redis.call('HGETALL', key)}))
end
"""
)


def task_key(task_id: str) -> str:
    return TASK_KEY_PREFIX + task_id


# KEYS: record, queue, payload, idempotency key. ARGV: max depth, ttl, message, payload bytes ('':
# none, the claim check is only for large ones), idempotency record ('' = no key:
# "<fingerprint>:<task id>", see api/idempotency.py), its ttl, field, value, ...
# The depth check, the record, the message (and a claim-checked payload, with the record's TTL) go
# in together, so a 429 leaves nothing behind. With an idempotency key, a live task already
# recorded under it is returned instead (its record), and a new one is recorded with the task:
# concurrent first requests with one key create exactly one task.
SUBMIT = """
if ARGV[5] ~= '' then
  local held = redis.call('GET', KEYS[4])
  if held then
    local _, colon = string.find(held, ':', 1, true)
    if redis.call('EXISTS', 'dispatch:task:' .. string.sub(held, colon + 1)) == 1 then
      return held
    end
  end
end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[3])
if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[6]) end
return 1
"""

# KEYS: record. ARGV: now, max deliveries, ttl, channel, task id, error of an expiry, worker name,
# error of a redelivered task whose deadline passed.
# Returns {verdict, deliveries}: 'run', a terminal status (a redelivered copy of a finished task),
# 'missing', or 'too_many'. A task past its deadline becomes 'expired' here, before TorchServe.
START = (
    PUBLISH_RECORD
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= 'queued' and status ~= 'running' then return {status, 0} end
local deliveries = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
if deliveries > tonumber(ARGV[2]) then return {'too_many', deliveries} end
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'deadline')) then
  -- Never started: expired. Started by a worker that died: it ran out of time (ARGV[8]).
  if status == 'queued' then
    redis.call('HSET', KEYS[1], 'status', 'expired', 'finished_at', ARGV[1], 'error', ARGV[6])
  else
    redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[8])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  batch_move(KEYS[1], status, redis.call('HGET', KEYS[1], 'status'), ARGV[1], ARGV[4])
  emit_webhook(KEYS[1], ARGV[5], redis.call('HGET', KEYS[1], 'status'), ARGV[1], ARGV[3])
  publish_record(KEYS[1], ARGV[4], ARGV[5])
  return {'expired', deliveries}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[7])
batch_move(KEYS[1], status, 'running', ARGV[1], ARGV[4])
-- A redelivered copy restarts a running task: task.started was sent for its first start.
if status == 'queued' then emit_webhook(KEYS[1], ARGV[5], 'running', ARGV[1], ARGV[3]) end
return {'run', deliveries}
"""
)

# KEYS: record, LAST_FINISHED_KEY. ARGV: status, now, field ('result' or 'error'), value, ttl,
# channel, task id[, field, value, ...] (e.g. the answer's content type).
# Only a live task finishes; a record that already ended keeps its first outcome.
# LAST_FINISHED_KEY lets /ready tell workers that complete work from workers that merely live.
FINISH = (
    PUBLISH_RECORD
    + """
redis.call('SET', KEYS[2], ARGV[2])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2], ARGV[3], ARGV[4],
  unpack(ARGV, 8))
redis.call('EXPIRE', KEYS[1], ARGV[5])
batch_move(KEYS[1], status, ARGV[1], ARGV[2], ARGV[6])
emit_webhook(KEYS[1], ARGV[7], ARGV[1], ARGV[2], ARGV[5])
publish_record(KEYS[1], ARGV[6], ARGV[7])
return 1
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
  batch_move(KEYS[1], 'queued', 'canceled', ARGV[1], ARGV[3])
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
batch_move(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[6])
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
    batch_move(key, 'queued', 'canceled', ARGV[1], ARGV[3])
    emit_webhook(key, task_id, 'canceled', ARGV[1], ARGV[2])
    publish_record(key, ARGV[3], task_id)
    canceled = canceled + 1
  end
end
return canceled
"""
)


def parse_published(message: str) -> tuple[str, dict[str, str]]:
    """(task id, record fields) from a FINISHED_CHANNEL message."""
    task_id, flat = json.loads(message)
    return task_id, dict(zip(flat[::2], flat[1::2], strict=True))


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
        prediction_value=json.loads(result) if result is not None else None,
        prediction_content_type=fields.get("result_type"),
        error=TaskError.model_validate_json(error) if error else None,
    )
