"""The worker's side of the task records: start, finish, heartbeat (sync redis-py)."""

from __future__ import annotations

import json
import os
import socket
import time
from enum import Enum
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared import records
from shared.errors import DeadlineExceeded, DispatchError, TaskExpired
from shared.models import TaskStatus
from shared.settings import Settings
from worker.refusals import retry_while_refused

# A short Redis restart should not turn into a rerun of the task: keep retrying record writes.
REDIS_RETRIES = 12
REDIS_BACKOFF_CAP = 2.0


class StartVerdict(str, Enum):
    """What START decided for one delivery of a task."""

    run = "run"  # call TorchServe
    too_many = "too_many"  # delivered more than MAX_DELIVERIES times: give up
    missing = "missing"  # no record (expired or never written): nothing to do
    done = "done"  # already terminal (a redelivered copy, canceled or expired): skip


class WorkerStore:
    """Atomic record transitions for one worker process."""

    def __init__(
        self, settings: Settings, client: redis.Redis | None = None, worker_name: str = ""
    ) -> None:
        self._settings = settings
        self._worker_name = worker_name or f"{os.getpid()}@{socket.gethostname()}"
        self.redis = client or redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=REDIS_BACKOFF_CAP), REDIS_RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self._start = self.redis.register_script(records.START)
        self._finish = self.redis.register_script(records.FINISH)

    def start(self, task_id: str) -> tuple[StartVerdict, int]:
        expired = TaskExpired("the task's deadline passed before a worker could start it")
        overran = DeadlineExceeded("the task's worker was lost and its deadline passed meanwhile")
        # While Redis refuses writes nothing is started (a refused script wrote nothing), and
        # the message stays unacknowledged: wait, never run the task unrecorded or ack it away.
        verdict, deliveries = retry_while_refused(
            lambda: self._start(
                keys=[records.task_key(task_id)],
                args=[
                    time.time(),
                    self._settings.max_deliveries,
                    self._settings.result_ttl,
                    records.FINISHED_CHANNEL,
                    task_id,
                    expired.body(task_id).model_dump_json(),
                    self._worker_name,
                    overran.body(task_id).model_dump_json(),
                ],
            ),
            f"starting task {task_id}",
        )
        if verdict in (StartVerdict.run, StartVerdict.too_many, StartVerdict.missing):
            return StartVerdict(verdict), int(deliveries)
        return StartVerdict.done, int(deliveries)

    def succeed(self, task_id: str, value: Any, content_type: str | None = None) -> bool:
        """`content_type`: the answer's when it is not JSON (kept for /tasks/{id}/result)."""
        extra = ("result_type", content_type) if content_type else ()
        return self._end(task_id, TaskStatus.succeeded, "result", json.dumps(value), *extra)

    def fail(self, task_id: str, error: DispatchError) -> bool:
        return self._end(task_id, TaskStatus.failed, "error", error.body(task_id).model_dump_json())

    def _end(self, task_id: str, status: TaskStatus, field: str, value: str, *extra: str) -> bool:
        # The outcome is in hand: keep it until Redis accepts the write rather than run again.
        ended = retry_while_refused(
            lambda: self._finish(
                keys=[records.task_key(task_id), records.LAST_FINISHED_KEY],
                args=[
                    status.value,
                    time.time(),
                    field,
                    value,
                    self._settings.result_ttl,
                    records.FINISHED_CHANNEL,
                    task_id,
                    *extra,
                ],
            ),
            f"storing the outcome of task {task_id}",
        )
        return bool(ended)
