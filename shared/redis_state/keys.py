"""Every Redis key and channel the dispatcher uses, under one namespace, and who writes each.

The names are defined here once, each declared with what the key layout table says of it (its
pattern, type, what it holds, the scripts that write it, its readers and its TTL): that is
`KEY_LAYOUT`, which docs/architecture.md renders (`layout_markdown`), so the table cannot drift
from the code. Python builds names with the functions below; the Lua scripts get them from the
table `K` that the loader (loader.py) generates from `LUA_KEYS` and puts in front of every
script, so no script spells a prefix itself. The scripts named in it are the files in
lua/; "plain commands" are writes outside a script (a single command is atomic by itself).

Kombu's own keys (the Celery queues' lists and its unacked index) are not ours to name, but we
write into some of them, so they are listed too, by reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.priorities import ALL_QUEUES, QUEUES

NAMESPACE = "dispatch:"
_TRANSITIONS = "task_start, task_finish, task_cancel, task_settle, batch_cancel_items"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One row of the key layout table."""

    pattern: str
    type: str
    holds: str
    written_by: str
    read_by: str
    ttl: str


_LAYOUT: list[KeySpec] = []


def _key(name: str, suffix: str, type: str, holds: str, written_by: str, read_by: str,
         ttl: str) -> str:  # fmt: skip
    """Declares key `name` (a prefix when `suffix` names what follows it) with its row."""
    _LAYOUT.append(KeySpec(name + suffix, type, holds, written_by, read_by, ttl))
    return name


# Each key once: its name, then what the key layout table says of it.
# fmt: off
TASK_KEY_PREFIX = _key(
    NAMESPACE + "task:", "<task id>", "hash", "a task's record (record.py: TaskField)",
    f"task_submit, batch_add_items; {_TRANSITIONS}; task_reconcile",
    "API reads (api/store.py, api/batch_store.py), every transition script",
    "RESULT_TTL; a batch item, once ended, as long as its batch",
)
PAYLOAD_KEY_PREFIX = _key(NAMESPACE + "payload:", "<task id>", "string",
    "a claim-checked payload's bytes",
    f"task_submit, batch_add_items; deleted by every ending ({_TRANSITIONS}), but one failed, "
    "expired or canceled with retry_keep (lib.lua publish_record), and by task_retry_link",
    "the worker, when it runs the task (shared/payloads.py); POST /tasks/{id}/retry",
    "RESULT_TTL; min(RETRY_KEEP_SECONDS, its record's) once kept for a retry")
QUEUED_KEY_PREFIX = _key(
    NAMESPACE + "queued:", "<queue>", "string (integer)",
    "tasks waiting in one priority class's queue",
    f"task_submit, batch_create (up); {_TRANSITIONS} (down, once per task)",
    "task_submit, batch_create (the 429 limit); API metrics and readiness", "none")
IDEMPOTENCY_KEY_PREFIX = _key(NAMESPACE + "idem:", "<sha256 of owner and key>", "string",
    '"<fingerprint>:<task id>" (record.py)', "task_submit", "task_submit", "IDEMPOTENCY_TTL")
BATCH_IDEMPOTENCY_KEY_PREFIX = _key(
    IDEMPOTENCY_KEY_PREFIX + "batch:", "<sha256 of owner and key>", "string",
    '"<fingerprint>:<batch id>" (record.py)', "batch_create", "batch_create", "IDEMPOTENCY_TTL",
)
BATCH_KEY_PREFIX = _key(NAMESPACE + "batch:", "<batch id>", "hash",
    "a batch's settings and per-status counters (batch.py: BatchField)",
    f"batch_create, batch_mark_canceling; its items' transitions ({_TRANSITIONS})",
    "API reads (api/batch_store.py)",
    "RESULT_TTL past its last item's bounds; RESULT_TTL once ended")
EVENT_KEY_PREFIX = _key(
    NAMESPACE + "webhook:event:", "<event id>", "hash",
    "one webhook event: state, ticket, attempts, a snapshot of its record",
    f"{_TRANSITIONS} (emit); outbox_promote, outbox_claim, outbox_outcome, outbox_retry, "
    "outbox_defer", "outbox_claim (the sender), GET /tasks/{id}/deliveries",
    "max(RESULT_TTL, MIN_EVENT_TTL)",
)
DUE_KEY = _key(NAMESPACE + "webhooks:due", "", "sorted set",
    "webhook event ids scored by when each is due (the outbox's schedule)",
    f"{_TRANSITIONS} (emit); every outbox_* script", "outbox_promote (the relay)", "none")
LOG_KEY_PREFIX = _key(
    NAMESPACE + "webhook:log:", "<task id>", "list",
    "a task's webhook attempts (JSON, the newest LOG_LIMIT)", "outbox_outcome",
    "GET /tasks/{id}/deliveries", "max(RESULT_TTL, MIN_EVENT_TTL)")
OUTPUT_KEY_PREFIX = _key(
    NAMESPACE + "webhook:output:", "<task id>", "hash",
    "a streamed task's task.output coalescing: events so far (seq), the one not read yet "
    "(pending), the stream id read up to (upto), when the last was read (read_at), stopped "
    "(a 410)", "stream_append (it also writes the task.output events into the event hashes and "
    "the due set), outbox_claim (reads the outputs into the event), outbox_outcome (stopped)",
    "the same scripts", "max(RESULT_TTL, MIN_EVENT_TTL)")
WORKERS_KEY = _key(NAMESPACE + "workers", "", "sorted set",
    "live prediction workers scored by their last heartbeat",
    "worker/heartbeat.py (plain commands; a worker leaves on shutdown, the others drop one "
    "that died)", "/ready, API metrics, task_reconcile (a running task's worker)", "none")
LAST_FINISHED_KEY = _key(
    NAMESPACE + "last_finished", "", "string",
    "when a task last finished (/ready tells stalled workers by it)", "task_finish", "/ready",
    "none",
)
WRITE_PROBE_KEY = _key(NAMESPACE + "ready_probe", "", "string",
    "whether Redis accepts writes", "/ready (plain SET)", "nobody", "60 s")
STREAM_KEY_PREFIX = _key(
    NAMESPACE + "stream:", "<task id>", "stream",
    "a streamed task's events: output chunks, restart marks, its error or done (streams.py)",
    "stream_append; its error or done: every ending (lib.lua end_stream)",
    "the API's stream hub (stream_reader.py), streams.read_after",
    "RESULT_TTL from its last append; its record's from its ending")
HUB_WAKE_KEY_PREFIX = _key(
    NAMESPACE + "stream_hub:", "<hub id>", "stream",
    "wake-ups of one API process's stream hub, whose blocking XREAD also reads this key",
    "stream_reader.py (plain XADD MAXLEN 1, when its subscribers change)",
    "that hub's own XREAD", "60 s from the last wake-up; deleted when the hub closes")
FINISHED_CHANNEL = _key(
    NAMESPACE + "finished", "", "pub/sub channel",
    "an ended task's record (or its id alone, published.py), an ended batch's hash",
    f"{_TRANSITIONS} (lib.lua publish_record, end_batch)",
    "every API process's listener (api/waiting.py)", "-")
OPEN_KEY = _key(NAMESPACE + "open", "", "sorted set",
    "accepted tasks not ended yet, scored by when each was accepted",
    "task_submit, batch_add_items (ZADD); every ending (lib.lua end_task: ZREM); "
    "task_reconcile (ZREM of a record gone)", "worker/reconciler.py", "none")
MESSAGE_KEY_PREFIX = _key(
    NAMESPACE + "message:", "<message id: its first task's id>", "hash",
    "a copy of one Celery message as pushed (body), how many of its tasks are open (open), "
    "so a message kombu lost can be pushed again, and until when it is kept for a retry "
    "(kept_until)", "task_submit, batch_add_items; every ending (lib.lua close_task: open "
    "down, deleted at 0 unless a task of it ended failed, expired or canceled with retry_keep)",
    "worker/reconciler.py, POST /tasks/{id}/retry",
    "RESULT_TTL; once none is open, until kept_until (at most RETRY_KEEP_SECONDS)")
RECONCILE_LOCK_KEY = _key(NAMESPACE + "reconcile:lock", "", "string",
    "the worker running this period's reconcile round", "worker/reconciler.py (SET NX PX)",
    "worker/reconciler.py", "RECONCILE_PERIOD_SECONDS")
RECONCILE_SUSPECTS_KEY = _key(NAMESPACE + "reconcile:suspects", "", "hash",
    'tasks the last round found lost: task id -> "<status>:<deliveries>:<reconciled>"',
    "worker/reconciler.py (plain MULTI)", "worker/reconciler.py",
    "10 x RECONCILE_PERIOD_SECONDS")
FIGURES_KEY_PREFIX = _key(
    NAMESPACE + "figures:", "<bucket start, epoch seconds>", "hash",
    "the console's bounded figures for one FIGURES_BUCKET_SECONDS slice of time: counters of "
    "submits, refusals, endings and failures by code, and duration histograms (figures.py)",
    f"task_submit, batch_add_items, task_start; every ending ({_TRANSITIONS}) (lib.lua "
    "count_figure)", "GET /status, the console (shared/redis_state/figures.py)",
    "FIGURES_KEEP_SECONDS")
RUNNING_KEY_PREFIX = _key(
    NAMESPACE + "running:", "<queue>", "string (integer)",
    "tasks of one priority class now running (in flight)",
    f"task_start (up); {_TRANSITIONS} (down, once per task leaving running)",
    "GET /status", "none")
RECENT_KEY = _key(NAMESPACE + "recent", "", "list",
    "the ids of the newest RECENT_LIMIT tasks submitted", "task_submit, batch_add_items",
    "the console's task list", "none (LTRIM)")
RECENT_FAILED_KEY = _key(NAMESPACE + "recent:failed", "", "list",
    "the ids of the newest RECENT_LIMIT tasks that failed or expired",
    "every ending (lib.lua end_task)", "the console's failures", "none (LTRIM)")
OPEN_BATCHES_KEY = _key(NAMESPACE + "batches:open", "", "sorted set",
    "batches in progress, scored by when each was created", "batch_create (ZADD); "
    "lib.lua end_batch (ZREM)", "GET /status, the console", "none")
WORKER_INFO_KEY_PREFIX = _key(
    NAMESPACE + "worker:", "<worker name>", "hash",
    "one worker's host, pid, queues, slots, calls in flight and last beat",
    "worker/heartbeat.py (plain HSET each beat)", "GET /status, the console",
    "LIVE_BEATS x the heartbeat interval, renewed each beat")
GONE_WORKERS_KEY = _key(NAMESPACE + "workers:gone", "", "sorted set",
    "workers that left or stopped beating in the last GONE_WORKERS_SECONDS, scored by their "
    "last beat", "worker/heartbeat.py (a worker leaving; the others' beats, for one that died)",
    "GET /status, the console", "entries older than GONE_WORKERS_SECONDS are dropped")
# Kombu's keys that the dispatcher writes into or relies on (kombu.transport.redis.Channel).
_key(", ".join((*ALL_QUEUES, "webhooks")), "", "list (kombu)",
     "Celery messages of 1..MESSAGE_MAX_TASKS tasks; webhook sends",
     "task_submit, batch_add_items (LPUSH); task_reconcile (RPUSH); Celery for webhooks",
     "kombu (BRPOP); worker/reconciler.py (LRANGE)", "none")
KOMBU_UNACKED_KEY, KOMBU_UNACKED_INDEX_KEY = "unacked", "unacked_index"
_key(f"{KOMBU_UNACKED_KEY}, {KOMBU_UNACKED_INDEX_KEY}", "", "hash, sorted set (kombu)",
     "messages delivered and not yet acknowledged, and when",
     "kombu; worker/heartbeat.py renews the index's scores of held messages (ZADD XX)",
     "kombu's visibility-timeout sweep; worker/reconciler.py (HSCAN)", "none")
# fmt: on

KEY_LAYOUT: tuple[KeySpec, ...] = tuple(_LAYOUT)

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
# The console's figures (shared/redis_state/figures.py): one hash per FIGURES_BUCKET_SECONDS of
# time, each kept FIGURES_KEEP_SECONDS (15 minutes of charts, and a bucket of slack for the one
# being written), so their memory depends on time, never on how many tasks pass.
FIGURES_BUCKET_SECONDS = 10
FIGURES_KEEP_SECONDS = 15 * 60 + 2 * FIGURES_BUCKET_SECONDS
# Upper edges (seconds) of the duration histograms' bins; one more bin holds what is above all.
FIGURE_EDGES: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, 600.0, 3600.0,
)  # fmt: skip
# How many task ids the console's lists keep (the newest), and how long gone workers are shown.
RECENT_LIMIT = 1000
GONE_WORKERS_SECONDS = 3600
# How many of a task's deliveries its record logs (`starts`, task_start): the console's timeline.
DELIVERY_LOG_LIMIT = 10


# The name of one key from its prefix: task_key("t") == "dispatch:task:t". Each is the prefix's
# own `+` (a C call: the API builds several per request).
task_key = TASK_KEY_PREFIX.__add__  # (task id)
payload_key = PAYLOAD_KEY_PREFIX.__add__  # (task id)
queued_key = QUEUED_KEY_PREFIX.__add__  # (Celery queue name, shared/priorities.py)
idempotency_key = IDEMPOTENCY_KEY_PREFIX.__add__  # (hash of the caller and its key)
batch_idempotency_key = BATCH_IDEMPOTENCY_KEY_PREFIX.__add__  # (the same, for POST /batches)
batch_key = BATCH_KEY_PREFIX.__add__  # (batch id)
event_key = EVENT_KEY_PREFIX.__add__  # (event id)
log_key = LOG_KEY_PREFIX.__add__  # (task id)
output_key = OUTPUT_KEY_PREFIX.__add__  # (task id)
stream_key = STREAM_KEY_PREFIX.__add__  # (task id)
hub_wake_key = HUB_WAKE_KEY_PREFIX.__add__  # (hub id)
message_key = MESSAGE_KEY_PREFIX.__add__  # (message id)
figures_key = FIGURES_KEY_PREFIX.__add__  # (bucket start, str(int))
running_key = RUNNING_KEY_PREFIX.__add__  # (Celery queue name)
worker_info_key = WORKER_INFO_KEY_PREFIX.__add__  # (worker name)


def parse_depth(raw: str | bytes | None) -> int:
    """A queued-task counter as read (absent: no task has been counted yet)."""
    return int(raw or 0)


# The table `K` every script sees (lib.lua and the scripts index it, e.g. K.task .. task_id).
LUA_KEYS: dict[str, str] = {
    "task": TASK_KEY_PREFIX,
    "payload": PAYLOAD_KEY_PREFIX,
    "queued": QUEUED_KEY_PREFIX,
    "batch": BATCH_KEY_PREFIX,
    "event": EVENT_KEY_PREFIX,
    "due": DUE_KEY,
    "finished": FINISHED_CHANNEL,
    "stream": STREAM_KEY_PREFIX,
    "output": OUTPUT_KEY_PREFIX,
    "open": OPEN_KEY,
    "message": MESSAGE_KEY_PREFIX,
    "workers": WORKERS_KEY,
    "figures": FIGURES_KEY_PREFIX,
    "running": RUNNING_KEY_PREFIX,
    "recent": RECENT_KEY,
    "recent_failed": RECENT_FAILED_KEY,
    "open_batches": OPEN_BATCHES_KEY,
}


def layout_markdown() -> str:
    """KEY_LAYOUT as a Markdown table (docs/architecture.md embeds it)."""
    rows = ["| Key | Type | Holds | Written by | Read by | TTL |", "|---|---|---|---|---|---|"]
    for spec in KEY_LAYOUT:
        rest = (spec.type, spec.holds, spec.written_by, spec.read_by, spec.ttl)
        cells = (f"`{spec.pattern}`", *(cell.replace("<", "&lt;") for cell in rest))
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def lua_prelude() -> dict[str, str]:
    """The Lua definitions scripts may use, by name: `K`, QUEUE_OF and the limits."""
    keys = ", ".join(f"{name} = {_lua_string(value)}" for name, value in LUA_KEYS.items())
    queues = ", ".join(
        f"[{_lua_string(priority.value)}] = {_lua_string(queue)}"
        for priority, queue in QUEUES.items()
    )
    return {
        "K": f"local K = {{{keys}}}",
        "QUEUE_OF": f"local QUEUE_OF = {{{queues}}}",
        "PUBLISH_INLINE_BYTES": f"local PUBLISH_INLINE_BYTES = {PUBLISH_INLINE_BYTES}",
        "MIN_EVENT_TTL": f"local MIN_EVENT_TTL = {MIN_EVENT_TTL}",
        "FIGURES_BUCKET": f"local FIGURES_BUCKET = {FIGURES_BUCKET_SECONDS}",
        "FIGURES_TTL": f"local FIGURES_TTL = {FIGURES_KEEP_SECONDS}",
        "FIGURE_EDGES": "local FIGURE_EDGES = {" + ", ".join(map(repr, FIGURE_EDGES)) + "}",
        "RECENT_LIMIT": f"local RECENT_LIMIT = {RECENT_LIMIT}",
        "DELIVERY_LOG_LIMIT": f"local DELIVERY_LOG_LIMIT = {DELIVERY_LOG_LIMIT}",
    }


def _lua_string(value: str) -> str:
    if "'" in value or "\\" in value or "\n" in value:
        raise ValueError(f"not a plain Lua string: {value!r}")
    return f"'{value}'"
