"""Queue depth in tasks: one counter per priority class, kept by the transition scripts.

A Celery message may carry several tasks (one group commit of the API, a slice of a batch: see
shared/celery_app.py), so the length of a queue's list counts messages, not tasks. The 429 limit
(MAX_QUEUE_DEPTH tasks per class), `dispatcher_queue_depth` and the autoscaling signal count
tasks instead: `dispatch:queued:<queue>` goes up in the script that records a task (SUBMIT_MANY,
the batch scripts) and down in the script that moves it out of `queued` (a start, a cancel, an
expiry), atomically with the record, so it cannot drift from the records by a crash in between.
A task leaves `queued` exactly once, whichever script moves it.
"""

from __future__ import annotations

from shared.priorities import QUEUES

QUEUED_KEY_PREFIX = "dispatch:queued:"


def queued_key(queue: str) -> str:
    """The counter of tasks waiting in `queue` (a Celery queue name, shared/priorities.py)."""
    return QUEUED_KEY_PREFIX + queue


def parse_depth(raw: str | bytes | None) -> int:
    """A counter as read; never below 0 (a record written before the counters existed may
    leave `queued` without having been counted in)."""
    return max(0, int(raw or 0))


_QUEUE_OF = ", ".join(f"['{priority.value}'] = '{queue}'" for priority, queue in QUEUES.items())

# Lua, prepended to every transition script (shared/records.py). `left_queue(key, old)`: the task
# of record `key` moved out of status `old`; when that was `queued`, its class's counter goes down.
# Records from before priority classes have no `priority`: they waited in the default queue.
LEAVE_QUEUE = f"""
local QUEUE_OF = {{{_QUEUE_OF}}}
local function left_queue(key, old)
  if old ~= 'queued' then return end
  local priority = redis.call('HGET', key, 'priority')
  local counter = '{QUEUED_KEY_PREFIX}' .. (QUEUE_OF[priority or 'default'] or 'dispatch')
  if redis.call('DECR', counter) < 0 then redis.call('SET', counter, 0) end
end
"""
