"""The worker's side of the task records: start and finish, many tasks per call, on its loop."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from enum import Enum

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from shared.errors import DeadlineExceeded, TaskExpired
from shared.payloads import PayloadRef, read_payload
from shared.redis_connect import async_client
from shared.redis_state.record import Outcome
from shared.redis_state.task_scripts import FinishTasks, StartTasks, StartTerms
from shared.settings import Settings
from worker.kombu_patches import retry_while_refused_async

# A short Redis restart should not turn into a rerun of the task: keep retrying record writes.
REDIS_RETRIES = 12
REDIS_BACKOFF_CAP = 2.0


class StartVerdict(str, Enum):
    """What START decided for one delivery of a task."""

    run = "run"  # call the model server
    too_many = "too_many"  # delivered more than MAX_DELIVERIES times: give up
    missing = "missing"  # no record (expired or never written): nothing to do
    done = "done"  # already terminal (a redelivered copy, canceled or expired): skip


def worker_name() -> str:
    """This process's name as Celery spells a worker's: `pid@host`."""
    return f"{os.getpid()}@{socket.gethostname()}"


# The engine's connections to Redis: its group commits and stream appends share them, each
# command a fraction of a millisecond, so 64 carry any number of tasks in flight.
POOL_SIZE = 64
POOL_WAIT_SECONDS = 10.0


def connect(settings: Settings) -> aioredis.Redis:
    """The engine's Redis client: record writes outlast a short Redis restart (retried with
    backoff) instead of failing the task's run."""
    return async_client(
        settings,
        socket_timeout=10,
        socket_connect_timeout=5,
        # A blocking pool: redis-py's default one raises MaxConnectionsError past 100
        # connections, which hundreds of streamed tasks appending chunks at once reach (the
        # bench's 1,000 streams); waiting a moment for a free connection is what they need.
        max_connections=POOL_SIZE,
        pool_timeout=POOL_WAIT_SECONDS,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=REDIS_BACKOFF_CAP), REDIS_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class WorkerStore:
    """Atomic record transitions for one worker process, on its event loop."""

    def __init__(self, settings: Settings, client: aioredis.Redis, worker: str = "") -> None:
        self._settings = settings
        self.redis = client
        expired = TaskExpired("the task's deadline passed before a worker could start it")
        overran = DeadlineExceeded("the task's worker was lost and its deadline passed meanwhile")
        self._terms = StartTerms(
            max_deliveries=settings.max_deliveries,
            ttl=settings.result_ttl,
            worker=worker or worker_name(),
            expired_error=expired.body().model_dump_json(),
            overran_error=overran.body().model_dump_json(),
        )
        self._start = StartTasks(client)
        self._finish = FinishTasks(client)

    async def start(self, task_ids: Sequence[str]) -> list[tuple[StartVerdict, int]]:
        """START tasks in one call: (verdict, deliveries) each, in order."""
        # While Redis refuses writes nothing is started (a refused script wrote nothing), and
        # the message stays unacknowledged: wait, never run the task unrecorded or ack it away.
        started = await retry_while_refused_async(
            lambda: self._start(task_ids, self._terms, time.time()),
            f"starting {len(task_ids)} task(s)",
        )
        return [_verdict(verdict, deliveries) for verdict, deliveries in started]

    async def finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Store the outcomes of several tasks in one call; False for a task that had ended."""
        # The outcomes are in hand: keep them until Redis accepts the write rather than run again.
        ttl = self._settings.result_ttl
        return await retry_while_refused_async(
            lambda: self._finish(outcomes, now=time.time(), ttl=ttl),
            f"storing the outcomes of {len(outcomes)} task(s)",
        )

    async def payload(self, ref: PayloadRef) -> bytes:
        """A task's payload bytes: inline in its message, or claim-checked in Redis."""
        return await read_payload(self.redis, ref)


def _verdict(verdict: str, deliveries: int) -> tuple[StartVerdict, int]:
    if verdict in (StartVerdict.run, StartVerdict.too_many, StartVerdict.missing):
        return StartVerdict(verdict), int(deliveries)
    return StartVerdict.done, int(deliveries)
