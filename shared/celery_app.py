"""The one Celery app, its task names, and the message format the API enqueues.

The API never imports worker code: it enqueues by task name. It also does not go through Celery's
(blocking) producer: `encode_message(s)` builds the same Celery protocol-2 message kombu's Redis
transport would push, so the API can push it with redis.asyncio in the same atomic script that
writes the task records (shared/redis_state/lua/task_submit.lua).
tests/unit/shared/test_celery_message.py keeps the format in step with what Celery produces.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import uuid
from typing import Any

from celery import Celery, signals

from shared import tracing
from shared.logs import configure_logging, current_request_id
from shared.redis_connect import celery_broker
from shared.settings import Settings, get_settings

# The one kind of message: 1..K tasks (`tasks`: [{"id", "call", "headers"}, ...]) from one group
# commit of the API or a slice of a batch; see worker/messages.py for how a worker runs it.
TASK_PREDICT_MANY = "dispatch.predict_many"
QUEUE = "dispatch"
# The message header (a worker reads it as `task.request.request_id`) carrying X-Request-ID.
REQUEST_ID_HEADER = "request_id"
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
# Waits 0, 0.5, 1, 1.5, 1.5, ... s between attempts: ~57 s in all, past a Sentinel failover
# (down-after-milliseconds, the election, the promotion) and a Redis restart.
PUBLISH_RETRY_POLICY = {
    "max_retries": 40,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1.5,
}


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app configured for at-least-once delivery over Redis, JSON only."""
    visibility = settings.visibility_timeout
    # On Sentinel: kombu's sentinel transport, its master and sentinels (shared/redis_connect.py);
    # TCP keepalive either way, so a broker connection to a lost machine does not hang.
    broker_url, broker_options = celery_broker(settings)
    transport_options = {
        **broker_options,
        # Redis has no acks: a fetched, unacked message is redelivered after this long. Live
        # workers renew the lease of every message they hold each heartbeat (worker/heartbeat.py),
        # so only a dead worker's messages come back, this long after it stopped renewing.
        "visibility_timeout": visibility,
        # How often workers look for such messages; kombu's default (10 s x 10) adds ~100 s.
        "unacked_restore_interval": max(1, min(10, visibility // 4)),
        "unacked_restore_throttle": 1,
        # Fail fast when Redis is gone, so reconnect logic (not a hung socket) takes over.
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "retry_on_timeout": True,
        # Detect half-dead connections after a Redis restart (celery#8030).
        "health_check_interval": 10,
        # The order a worker reads the priority classes' queues in (shared/priorities.py), by
        # name: only a worker's kombu resolves it (worker/kombu_patches/queue_cycle.py).
        "queue_order_strategy": "worker.kombu_patches.queue_cycle:InteractiveFirst",
    }
    app = Celery("dispatcher", broker=broker_url, set_as_current=False)
    app.conf.update(
        # JSON only: pickle from the broker would be remote code execution.
        task_serializer="json",
        accept_content=["json"],
        # Results live in the dispatcher's own records (shared/redis_state), not Celery's backend.
        task_ignore_result=True,
        result_backend=None,
        # Ack after the task ran, and give the message back if the worker process dies, so a
        # SIGKILL/OOM mid-task means redelivery instead of a lost task.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Same options for the broker and anything else that reads them (one visibility timeout).
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting while Redis is down
        # A publish (the webhook relay's) retries for ~1 min, longer than a failover (Celery's
        # default gives up after ~0.6 s).
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        task_default_queue=QUEUE,
        # Hard stop for a stuck task on the prefork pool; deadlines are enforced before this.
        task_time_limit=int(settings.task_time_limit) + 30,
        # Events cost a publish per task; nothing here consumes them.
        worker_send_task_events=False,
        task_send_sent_event=False,
        # Fetch only into a free pool slot: a prefetched batch message would hold a worker
        # while an interactive one waits behind it (shared/priorities.py).
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_hijack_root_logger=False,
    )
    return app


# A receiver of `setup_logging` replaces Celery's own logging set-up (handlers, formats, stdout
# redirection) in every worker of these apps: its loggers go through shared/logs.py too.
@signals.setup_logging.connect  # type: ignore[untyped-decorator]
def _worker_logging(loglevel: int | str | None = None, **_: Any) -> None:
    configure_logging(get_settings().log_format, loglevel or "INFO")


# Earlier still, so the worker's start-up warnings (running as root...) are log lines as well.
@signals.celeryd_init.connect  # type: ignore[untyped-decorator]
def _worker_init_logging(options: dict[str, Any] | None = None, **_: Any) -> None:
    _worker_logging((options or {}).get("loglevel"))


def quiet_per_task_logs(settings: Settings) -> None:
    """Both worker apps: per-task INFO lines ("received", "succeeded", httpx's "HTTP Request")
    cost a noticeable share of a worker's CPU per task (docs/BENCHMARKS.md), so they are off unless
    WORKER_LOG_TASKS is set; failures still log at WARNING and above, start-up at INFO."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not settings.worker_log_tasks:
        for per_task_logger in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(per_task_logger).setLevel(logging.WARNING)


def task_headers() -> dict[str, Any]:
    """What travels with one task from the request that made it: its request id and trace."""
    headers: dict[str, Any] = {}
    request_id = current_request_id()
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    tracing.inject(headers)
    return headers


def encode_task_message(
    task_id: str,
    kwargs: dict[str, Any],
    *,
    queue: str = QUEUE,
    context: bool = True,
) -> str:
    """The kombu Redis-transport envelope of a `TASK_PREDICT_MANY` call, ready for LPUSH.
    `context`: put the current request's id and trace into the message's headers (a message of
    several requests' tasks carries them per task instead)."""
    body = json.dumps(
        [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    # Arguments can carry TorchServe credentials: keep them out of logs and event streams.
    redacted = "[redacted]"
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_PREDICT_MANY,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": redacted,
        "kwargsrepr": redacted,
        "origin": _ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    # The request this task is for: its id and trace travel with the message to the worker.
    if context:
        headers.update(task_headers())
    envelope = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope)


def encode_message(tasks: list[dict[str, Any]], *, queue: str = QUEUE) -> str:
    """One `TASK_PREDICT_MANY` message for `tasks` ({"id", "call", "headers"} each). Each task
    keeps its id, record and outcome; the message only carries them. Its own id is its first
    task's (unique: a task is in one message), so Celery's log lines about a one-task message
    name that task."""
    message_id = tasks[0]["id"] if tasks else str(uuid.uuid4())
    kwargs = {"tasks": tasks}
    return encode_task_message(message_id, kwargs, queue=queue, context=False)


_ID, _BODY = "@@message-id@@", "@@body@@"  # neither can occur in base64 or in a task id
_EMBED = json.dumps({"callbacks": None, "errbacks": None, "chain": None, "chord": None})


def encode_messages(
    calls: list[tuple[str, str]], *, queue: str = QUEUE, per_message: int
) -> list[str]:
    """`TASK_PREDICT_MANY` messages for many tasks of one request (a batch): (task id, JSON of
    its `call`) each, `per_message` tasks a message. The envelope is built once and each message
    is that template with its id and body filled in, far cheaper than building every envelope
    of a 10,000-task batch. The message id and delivery tag are the first task's id (unique)."""
    envelope = json.loads(encode_message([], queue=queue))
    envelope["body"] = _BODY
    envelope["headers"]["id"] = envelope["headers"]["root_id"] = _ID
    envelope["properties"]["correlation_id"] = envelope["properties"]["delivery_tag"] = _ID
    template = json.dumps(envelope)
    headers = json.dumps(task_headers())
    messages = []
    for start in range(0, len(calls), per_message):
        chunk = calls[start : start + per_message]
        tasks = ", ".join(
            f'{{"id": "{task_id}", "call": {call}, "headers": {headers}}}'
            for task_id, call in chunk
        )
        body = f'[[], {{"tasks": [{tasks}]}}, {_EMBED}]'
        message = template.replace(_BODY, base64.b64encode(body.encode()).decode())
        messages.append(message.replace(_ID, chunk[0][0]))
    return messages
