"""Batches in Redis: one hash of counters per batch, kept by the tasks' own transition scripts.

A batch `<id>` of N requests is the hash `dispatch:batch:<id>` (owner, timestamps, status, the
webhook, and one counter per task status) plus N ordinary tasks `<id>-0` ... `<id>-<N-1>`, whose
records carry `batch` and `custom_id`. Task ids follow from the batch id and the index, so no
list of 10,000 ids is stored and results are read in input order by index.

Counts stay cheap: every transition script of shared/records.py calls `batch_move` (BATCH_MOVE
below) in the same atomic step that changes the task, so `GET /batches/{id}` reads one hash
instead of 10,000 records, and the transition that ends the last item also ends the batch:
status `completed` (or `canceled` after a DELETE), its `batch.completed` webhook event written to
the outbox (shared/outbox.py), and the batch's hash published on the channel every waiter
listens to (api/waiting.py), so `?wait=N` needs no polling.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum

from pydantic import BaseModel

from shared.outbox import DUE_KEY, EVENT_KEY_PREFIX, MIN_EVENT_TTL

BATCH_KEY_PREFIX = "dispatch:batch:"
# The task statuses a batch counts, in the order `request_counts` shows them.
COUNTED = ("queued", "running", "succeeded", "failed", "canceled", "expired")
BATCH_EVENTS = ("batch.completed",)


def batch_key(batch_id: str) -> str:
    return BATCH_KEY_PREFIX + batch_id


def item_task_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index}"


class BatchStatus(str, Enum):
    in_progress = "in_progress"
    canceling = "canceling"  # DELETE canceled the queued items; running ones still finish
    completed = "completed"
    canceled = "canceled"

    @property
    def ended(self) -> bool:
        return self in (BatchStatus.completed, BatchStatus.canceled)


class RequestCounts(BaseModel):
    total: int
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    expired: int = 0


class BatchView(BaseModel):
    """`GET /batches/{id}`, the 202 of `POST /batches` and the `data` of `batch.completed`."""

    batch_id: str
    status: BatchStatus
    request_counts: RequestCounts
    created_at: datetime
    cancel_requested_at: datetime | None = None
    finished_at: datetime | None = None
    status_url: str
    results_url: str


def _time(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), UTC) if raw else None


def decode_batch(batch_id: str, fields: Mapping[str, str]) -> BatchView:
    counts = {name: max(0, int(fields.get(name) or 0)) for name in COUNTED}
    return BatchView(
        batch_id=batch_id,
        status=BatchStatus(fields["status"]),
        request_counts=RequestCounts(total=int(fields["total"]), **counts),
        created_at=datetime.fromtimestamp(float(fields["created_at"]), UTC),
        cancel_requested_at=_time(fields.get("cancel_requested_at")),
        finished_at=_time(fields.get("finished_at")),
        status_url=f"/batches/{batch_id}",
        results_url=f"/batches/{batch_id}/results",
    )


# Lua, prepended to every transition script (shared/records.py): called with the task's record
# key, its status before and after the transition, the time, and the finished channel. A no-op for
# tasks outside batches. An item that ended keeps its record as long as its batch (so results stay
# readable as long as the batch is), and the last item to end ends the batch.
BATCH_MOVE = f"""
local function end_batch(bkey, batch, now, channel)
  local status = 'completed'
  if redis.call('HGET', bkey, 'cancel_requested_at') then status = 'canceled' end
  redis.call('HSET', bkey, 'status', status, 'finished_at', now)
  local ttl = tonumber(redis.call('HGET', bkey, 'ttl'))
  redis.call('EXPIRE', bkey, ttl)
  local hook = redis.call('HMGET', bkey, 'webhook', 'webhook_events')
  if hook[1] and string.find(',' .. (hook[2] or '') .. ',', ',batch.completed,', 1, true) then
    local id = 'msg_' .. (string.gsub(batch, '-', '')) .. '_batch_completed'
    local event = '{EVENT_KEY_PREFIX}' .. id
    redis.call('HSET', bkey, 'webhook_event', id)
    redis.call('HSET', event, 'task_id', batch, 'type', 'batch.completed', 'at', now,
      'url', hook[1], 'record', cjson.encode(redis.call('HGETALL', bkey)), 'state', 'pending',
      'attempts', 0, 'round', 0, 'ticket', 0)
    redis.call('EXPIRE', event, math.max(ttl, {MIN_EVENT_TTL}))
    redis.call('ZADD', '{DUE_KEY}', now, id)
  end
  redis.call('PUBLISH', channel, cjson.encode({{batch, redis.call('HGETALL', bkey)}}))
end

local function batch_move(key, old, new, now, channel)
  local batch = redis.call('HGET', key, 'batch')
  if not batch or old == new then return end
  local bkey = '{BATCH_KEY_PREFIX}' .. batch
  if redis.call('EXISTS', bkey) == 0 then return end
  redis.call('HINCRBY', bkey, old, -1)
  redis.call('HINCRBY', bkey, new, 1)
  if new == 'running' then return end
  local left = redis.call('TTL', bkey)
  if left > redis.call('TTL', key) then redis.call('EXPIRE', key, left) end
  local ended = redis.call('HINCRBY', bkey, 'ended', 1)
  if ended == tonumber(redis.call('HGET', bkey, 'total')) then
    end_batch(bkey, batch, now, channel)
  end
end
"""

# KEYS: batch, idempotency key (or the batch key again: none), then the queued-task counter
# (shared/queue_depth.py) of each class used.
# ARGV: max depth, idempotency record ('' = none), its ttl, batch ttl, the number of items per
# queue in KEYS' order, then field, value, ... of the batch hash.
# Returns 1 (created), 0 (a queue would exceed the depth limit: nothing written) or the record held
# under the idempotency key (a replay). Run first in the MULTI that adds the items (ADD_ITEMS),
# which add nothing when this created no batch.
CREATE = f"""
local queues = #KEYS - 2
if ARGV[2] ~= '' then
  local held = redis.call('GET', KEYS[2])
  if held then
    local _, colon = string.find(held, ':', 1, true)
    if redis.call('EXISTS', '{BATCH_KEY_PREFIX}' .. string.sub(held, colon + 1)) == 1 then
      return held
    end
  end
end
for i = 1, queues do
  if tonumber(redis.call('GET', KEYS[2 + i]) or '0') + tonumber(ARGV[4 + i]) > tonumber(ARGV[1])
  then
    return 0
  end
end
for i = 1, queues do redis.call('INCRBY', KEYS[2 + i], ARGV[4 + i]) end
for i = 5 + queues, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3]) end
return 1
"""

# KEYS: batch. ARGV: record ttl, created_at, owner, batch id, the items as JSON (each [index,
# queue, [field, value, ...] of its record, the number of its claim-checked payload among this
# call's payloads or 0]), the queue of each message as JSON, then the messages (each carries
# several items: shared/celery_app.py), then the payloads. One JSON argument instead of a dozen
# per item: packing 120,000 arguments cost the API more than everything else in a 10,000 batch.
# The messages go in with one LPUSH per queue: a third less Redis time with the AOF on, which
# logs every write command.
ADD_ITEMS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
local ttl, now, owner, batch = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local queues = cjson.decode(ARGV[6])
for _, item in ipairs(cjson.decode(ARGV[5])) do
  local task_id = batch .. '-' .. item[1]
  local key = 'dispatch:task:' .. task_id
  redis.call('HSET', key, 'status', 'queued', 'created_at', now, 'owner', owner, 'batch', batch,
    unpack(item[3]))
  redis.call('EXPIRE', key, ttl)
  if item[4] > 0 then
    redis.call('SET', 'dispatch:payload:' .. task_id, ARGV[6 + #queues + item[4]], 'EX', ttl)
  end
end
local messages = {}
for n, queue in ipairs(queues) do
  messages[queue] = messages[queue] or {}
  table.insert(messages[queue], ARGV[6 + n])
end
for queue, queued in pairs(messages) do redis.call('LPUSH', queue, unpack(queued)) end
return 1
"""

# KEYS: batch. ARGV: now. Marks a live batch `canceling`; returns its status before.
MARK_CANCELING = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'canceling', 'cancel_requested_at', ARGV[1])
end
return status or ''
"""
