"""The worker's side of the task records: start and finish, several tasks per call (sync)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from enum import Enum

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.errors import DeadlineExceeded, TaskExpired
from shared.redis_state.record import Outcome
from shared.redis_state.task_scripts import FinishTasks, StartTasks
from shared.settings import Settings
from worker.kombu_patches import retry_while_refused

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
        self._start = StartTasks(self.redis)
        self._finish = FinishTasks(self.redis)

    def start(self, task_ids: Sequence[str]) -> list[tuple[StartVerdict, int]]:
        """START every task of one message in one call: (verdict, deliveries) each, in order."""
        expired = TaskExpired("the task's deadline passed before a worker could start it")
        overran = DeadlineExceeded("the task's worker was lost and its deadline passed meanwhile")
        # While Redis refuses writes nothing is started (a refused script wrote nothing), and
        # the message stays unacknowledged: wait, never run the task unrecorded or ack it away.
        started = retry_while_refused(
            lambda: self._start(
                task_ids,
                now=time.time(),
                max_deliveries=self._settings.max_deliveries,
                ttl=self._settings.result_ttl,
                worker=self._worker_name,
                expired_error=expired.body().model_dump_json(),
                overran_error=overran.body().model_dump_json(),
            ),
            f"starting {len(task_ids)} task(s)",
        )
        return [_verdict(verdict, deliveries) for verdict, deliveries in started]

    def finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Store the outcomes of several tasks in one call; False for a task that had ended."""
        # The outcomes are in hand: keep them until Redis accepts the write rather than run again.
        return retry_while_refused(
            lambda: self._finish(outcomes, now=time.time(), ttl=self._settings.result_ttl),
            f"storing the outcomes of {len(outcomes)} task(s)",
        )


def _verdict(verdict: str, deliveries: int) -> tuple[StartVerdict, int]:
    if verdict in (StartVerdict.run, StartVerdict.too_many, StartVerdict.missing):
        return StartVerdict(verdict), int(deliveries)
    return StartVerdict.done, int(deliveries)
