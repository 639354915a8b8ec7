"""The worker's side of the task records: start and finish, several tasks per call (sync)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
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
        self._start = self.redis.register_script(records.START_MANY)
        self._finish = self.redis.register_script(records.FINISH_MANY)

    def start(self, task_ids: Sequence[str]) -> list[tuple[StartVerdict, int]]:
        """START every task of one message in one call: (verdict, deliveries) each, in order."""
        expired = TaskExpired("the task's deadline passed before a worker could start it")
        overran = DeadlineExceeded("the task's worker was lost and its deadline passed meanwhile")
        # While Redis refuses writes nothing is started (a refused script wrote nothing), and
        # the message stays unacknowledged: wait, never run the task unrecorded or ack it away.
        flat = retry_while_refused(
            lambda: self._start(
                args=[
                    time.time(),
                    self._settings.max_deliveries,
                    self._settings.result_ttl,
                    records.FINISHED_CHANNEL,
                    self._worker_name,
                    expired.body().model_dump_json(),
                    overran.body().model_dump_json(),
                    *task_ids,
                ],
            ),
            f"starting {len(task_ids)} task(s)",
        )
        return [_verdict(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

    def finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Store the outcomes of several tasks in one call; False for a task that had ended."""
        entries = []
        values: list[str] = []
        for outcome in outcomes:
            values.append(outcome.value)
            entries.append(
                [
                    outcome.task_id,
                    outcome.status.value,
                    outcome.field,
                    4 + len(values),
                    outcome.extra,
                ]
            )
        # The outcomes are in hand: keep them until Redis accepts the write rather than run again.
        ended = retry_while_refused(
            lambda: self._finish(
                keys=[records.LAST_FINISHED_KEY],
                args=[
                    time.time(),
                    self._settings.result_ttl,
                    records.FINISHED_CHANNEL,
                    json.dumps(entries),
                    *values,
                ],
            ),
            f"storing the outcomes of {len(outcomes)} task(s)",
        )
        return [bool(flag) for flag in ended]


def _verdict(verdict: str, deliveries: int) -> tuple[StartVerdict, int]:
    if verdict in (StartVerdict.run, StartVerdict.too_many, StartVerdict.missing):
        return StartVerdict(verdict), int(deliveries)
    return StartVerdict.done, int(deliveries)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one task ended, as FINISH_MANY stores it."""

    task_id: str
    status: TaskStatus
    field: str  # 'result' or 'error'
    value: str  # JSON
    extra: list[str] = dataclass_field(default_factory=list)  # more fields: name, value, ...

    @classmethod
    def succeeded(cls, task_id: str, value: Any, content_type: str | None = None) -> Outcome:
        """`content_type`: the answer's when it is not JSON (kept for /tasks/{id}/result)."""
        extra = ["result_type", content_type] if content_type else []
        return cls(task_id, TaskStatus.succeeded, "result", json.dumps(value), extra)

    @classmethod
    def failed(cls, task_id: str, error: DispatchError) -> Outcome:
        return cls(task_id, TaskStatus.failed, "error", error.body(task_id).model_dump_json())
