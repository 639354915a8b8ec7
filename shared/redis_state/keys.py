"""Every Redis key and channel the dispatcher uses, under one namespace, and who writes each.

The names are defined here once. Python builds them with the functions below; the Lua scripts
get them from the table `K` that the loader (loader.py) generates from `LUA_KEYS` and puts in
front of every script, so no script spells a prefix itself. `KEY_LAYOUT` describes each key
(pattern, type, writers, readers, TTL) as data: docs/architecture.md's key layout table is
rendered from it, so it cannot drift from the code. The scripts named in it are the files in
lua/; "plain commands" are writes outside a script (a single command is atomic by itself).

Kombu's own keys (the Celery queues' lists and its unacked index) are not ours to name, but we
write into some of them, so they are listed too, by reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.priorities import ALL_QUEUES, QUEUES

NAMESPACE = "dispatch:"

# Hash: one task's record (record.py names its fields). TTL: RESULT_TTL from its submit, set
# again when it ends; a batch item's record is kept as long as its batch once it ends.
TASK_KEY_PREFIX = NAMESPACE + "task:"
# String: a claim-checked payload's bytes (shared/payloads.py), TTL RESULT_TTL; deleted by
# whichever script ends the task.
PAYLOAD_KEY_PREFIX = NAMESPACE + "payload:"
# String (integer): tasks waiting in one priority class's queue; no TTL. Up when a task is
# recorded, down once when it leaves `queued` (lib.lua's left_queue).
QUEUED_KEY_PREFIX = NAMESPACE + "queued:"
# String "<fingerprint>:<task id>" (record.py), TTL IDEMPOTENCY_TTL, written by task_submit.
IDEMPOTENCY_KEY_PREFIX = NAMESPACE + "idem:"
# String "<fingerprint>:<batch id>", TTL IDEMPOTENCY_TTL, written by batch_create.
BATCH_IDEMPOTENCY_KEY_PREFIX = IDEMPOTENCY_KEY_PREFIX + "batch:"
# Hash: a batch's counters and settings (batch.py names its fields); TTL set by batch_create,
# RESULT_TTL again once the batch ends.
BATCH_KEY_PREFIX = NAMESPACE + "batch:"
# Hash: one webhook event (its state, ticket, attempts and a snapshot of the record it is
# about); TTL max(RESULT_TTL, MIN_EVENT_TTL).
EVENT_KEY_PREFIX = NAMESPACE + "webhook:event:"
# List of JSON attempts: a task's webhook delivery log (the newest LOG_LIMIT), written by
# outbox_outcome; TTL max(RESULT_TTL, MIN_EVENT_TTL).
LOG_KEY_PREFIX = NAMESPACE + "webhook:log:"
# Sorted set: webhook event ids scored by when each is due (the outbox's schedule); no TTL.
DUE_KEY = NAMESPACE + "webhooks:due"
# Sorted set: live prediction workers scored by their last heartbeat (worker/heartbeat.py, plain
# commands); no TTL: a worker leaves on shutdown, the others drop one that died.
WORKERS_KEY = NAMESPACE + "workers"
# String: when a task last finished (task_finish); /ready tells stalled workers by it. No TTL.
LAST_FINISHED_KEY = NAMESPACE + "last_finished"
# String: written by every /ready check (a plain SET, TTL 60 s) to learn whether Redis accepts
# writes.
WRITE_PROBE_KEY = NAMESPACE + "ready_probe"
# Pub/sub channel: every ended task's record (or its id alone) and every ended batch's hash.
FINISHED_CHANNEL = NAMESPACE + "finished"
# A task's record is published whole unless its result is longer than this: then only its id
# (every API process receives every publish; the one waiting reads the record).
PUBLISH_INLINE_BYTES = 16 * 1024

# A worker counts as live while its last beat is at most LIVE_BEATS heartbeat intervals old;
# registry entries older than STALE_BEATS intervals are dropped by the other workers' beats.
LIVE_BEATS = 3
STALE_BEATS = 30
# Webhook events and delivery logs outlive RESULT_TTL when that is shorter than this: a retry
# schedule of hours must not lose its event. Settings keep the schedule within it.
MIN_EVENT_TTL = 3 * 86_400
# Entries of a task's delivery log kept (the newest).
LOG_LIMIT = 200

# Kombu's keys that the dispatcher writes into or relies on (kombu.transport.redis.Channel).
KOMBU_UNACKED_KEY = "unacked"
KOMBU_UNACKED_INDEX_KEY = "unacked_index"


def task_key(task_id: str) -> str:
    return TASK_KEY_PREFIX + task_id


def payload_key(task_id: str) -> str:
    return PAYLOAD_KEY_PREFIX + task_id


def queued_key(queue: str) -> str:
    """The counter of tasks waiting in `queue` (a Celery queue name, shared/priorities.py)."""
    return QUEUED_KEY_PREFIX + queue


def parse_depth(raw: str | bytes | None) -> int:
    """A queued-task counter as read (absent: no task has been counted yet)."""
    return int(raw or 0)


def idempotency_key(scoped: str) -> str:
    """`scoped`: the hash of the caller and its Idempotency-Key (api/idempotency.py)."""
    return IDEMPOTENCY_KEY_PREFIX + scoped


def batch_idempotency_key(scoped: str) -> str:
    return BATCH_IDEMPOTENCY_KEY_PREFIX + scoped


def batch_key(batch_id: str) -> str:
    return BATCH_KEY_PREFIX + batch_id


def event_key(event_id: str) -> str:
    return EVENT_KEY_PREFIX + event_id


def log_key(task_id: str) -> str:
    return LOG_KEY_PREFIX + task_id


# The table `K` every script sees (lib.lua and the scripts index it, e.g. K.task .. task_id).
LUA_KEYS: dict[str, str] = {
    "task": TASK_KEY_PREFIX,
    "payload": PAYLOAD_KEY_PREFIX,
    "queued": QUEUED_KEY_PREFIX,
    "batch": BATCH_KEY_PREFIX,
    "event": EVENT_KEY_PREFIX,
    "due": DUE_KEY,
    "finished": FINISHED_CHANNEL,
}


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One row of the key layout table."""

    pattern: str
    type: str
    holds: str
    written_by: str
    read_by: str
    ttl: str


_TRANSITIONS = "task_start, task_finish, task_cancel, task_settle, batch_cancel_items"

KEY_LAYOUT: tuple[KeySpec, ...] = (
    KeySpec(
        TASK_KEY_PREFIX + "<task id>", "hash", "a task's record (record.py: TaskField)",
        f"task_submit, batch_add_items; {_TRANSITIONS}",
        "API reads (api/store.py, api/batch_store.py), every transition script",
        "RESULT_TTL; a batch item, once ended, as long as its batch",
    ),
    KeySpec(
        PAYLOAD_KEY_PREFIX + "<task id>", "string", "a claim-checked payload's bytes",
        f"task_submit, batch_add_items; deleted by every ending ({_TRANSITIONS})",
        "the worker, when it runs the task (shared/payloads.py)", "RESULT_TTL",
    ),
    KeySpec(
        QUEUED_KEY_PREFIX + "<queue>", "string (integer)",
        "tasks waiting in one priority class's queue",
        f"task_submit, batch_create (up); {_TRANSITIONS} (down, once per task)",
        "task_submit, batch_create (the 429 limit); API metrics and readiness", "none",
    ),
    KeySpec(
        IDEMPOTENCY_KEY_PREFIX + "<sha256 of owner and key>", "string",
        '"<fingerprint>:<task id>" (record.py)', "task_submit", "task_submit", "IDEMPOTENCY_TTL",
    ),
    KeySpec(
        BATCH_IDEMPOTENCY_KEY_PREFIX + "<sha256 of owner and key>", "string",
        '"<fingerprint>:<batch id>" (record.py)', "batch_create", "batch_create",
        "IDEMPOTENCY_TTL",
    ),
    KeySpec(
        BATCH_KEY_PREFIX + "<batch id>", "hash",
        "a batch's settings and per-status counters (batch.py: BatchField)",
        f"batch_create, batch_mark_canceling; its items' transitions ({_TRANSITIONS})",
        "API reads (api/batch_store.py)",
        "RESULT_TTL past its last item's bounds; RESULT_TTL once ended",
    ),
    KeySpec(
        EVENT_KEY_PREFIX + "<event id>", "hash",
        "one webhook event: state, ticket, attempts, a snapshot of its record",
        f"{_TRANSITIONS} (emit); outbox_promote, outbox_claim, outbox_outcome, outbox_retry, "
        "outbox_defer",
        "outbox_claim (the sender), GET /tasks/{id}/deliveries",
        "max(RESULT_TTL, MIN_EVENT_TTL)",
    ),
    KeySpec(
        DUE_KEY, "sorted set", "webhook event ids scored by when each is due",
        f"{_TRANSITIONS} (emit); every outbox_* script", "outbox_promote (the relay)", "none",
    ),
    KeySpec(
        LOG_KEY_PREFIX + "<task id>", "list", "a task's webhook attempts (JSON, newest kept)",
        "outbox_outcome", "GET /tasks/{id}/deliveries", "max(RESULT_TTL, MIN_EVENT_TTL)",
    ),
    KeySpec(
        WORKERS_KEY, "sorted set", "live prediction workers scored by their last heartbeat",
        "worker/heartbeat.py (plain commands)", "/ready, API metrics", "none",
    ),
    KeySpec(
        LAST_FINISHED_KEY, "string", "when a task last finished", "task_finish", "/ready",
        "none",
    ),
    KeySpec(
        WRITE_PROBE_KEY, "string", "whether Redis accepts writes", "/ready (plain SET)",
        "nobody", "60 s",
    ),
    KeySpec(
        FINISHED_CHANNEL, "pub/sub channel",
        "an ended task's record (or its id alone, published.py), an ended batch's hash",
        f"{_TRANSITIONS} (lib.lua publish_record, end_batch)",
        "every API process's listener (api/waiting.py)", "-",
    ),
    KeySpec(
        ", ".join((*ALL_QUEUES, "webhooks")), "list (kombu)",
        "Celery messages of 1..MESSAGE_MAX_TASKS tasks; webhook sends",
        "task_submit, batch_add_items (LPUSH); Celery for webhooks", "kombu (BRPOP)", "none",
    ),
    KeySpec(
        KOMBU_UNACKED_KEY + ", " + KOMBU_UNACKED_INDEX_KEY, "hash, sorted set (kombu)",
        "messages delivered and not yet acknowledged, and when",
        "kombu; worker/heartbeat.py renews the index's scores of held messages (ZADD XX)",
        "kombu's visibility-timeout sweep", "none",
    ),
)  # fmt: skip


def layout_markdown() -> str:
    """KEY_LAYOUT as a Markdown table (docs/architecture.md embeds it)."""
    rows = ["| Key | Type | Holds | Written by | Read by | TTL |", "|---|---|---|---|---|---|"]
    for spec in KEY_LAYOUT:
        rest = (spec.type, spec.holds, spec.written_by, spec.read_by, spec.ttl)
        cells = (f"`{spec.pattern}`", *(cell.replace("<", "&lt;") for cell in rest))
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def lua_prelude() -> str:
    """The Lua put before lib.lua in every script: `K`, QUEUE_OF and the limits scripts use."""
    keys = ", ".join(f"{name} = {_lua_string(value)}" for name, value in LUA_KEYS.items())
    queues = ", ".join(
        f"[{_lua_string(priority.value)}] = {_lua_string(queue)}"
        for priority, queue in QUEUES.items()
    )
    return (
        "-- Generated by shared/redis_state/keys.py: the key names and limits of every script.\n"
        f"local K = {{{keys}}}\n"
        f"local QUEUE_OF = {{{queues}}}\n"
        f"local PUBLISH_INLINE_BYTES = {PUBLISH_INLINE_BYTES}\n"
        f"local MIN_EVENT_TTL = {MIN_EVENT_TTL}\n"
    )


def _lua_string(value: str) -> str:
    if "'" in value or "\\" in value or "\n" in value:
        raise ValueError(f"not a plain Lua string: {value!r}")
    return f"'{value}'"
