"""The reconciler: an accepted task whose Celery message kombu lost is enqueued again.

Why. The task record is the source of truth, but kombu's Redis transport has gaps in which a
message exists nowhere a worker will look: `_put` is a plain LPUSH; between BRPOP and kombu's
write of the message into its `unacked` hash the message lives only in one worker's memory (a
worker killed there, or a failover that keeps the BRPOP but not the unacked write, loses it);
and a Sentinel failover drops whatever the new primary had not received (issue 19). The task's
record says `queued` (or `running`, on a worker that died) forever, and the API only expires it
at its deadline.

What. Each submit indexes the task in K.open (keys.py OPEN_KEY) and keeps a copy of its message
(MESSAGE_KEY_PREFIX) in the same script as its record; every ending removes both (lua/lib.lua
close_task). Every RECONCILE_PERIOD_SECONDS one worker of the fleet (a Redis lock, SET NX PX,
that also spaces the rounds) runs a round: the open tasks accepted more than
RECONCILE_AFTER_SECONDS ago, whose id is in no message of the priority classes' queues and of
kombu's unacked hash, and which are `queued` or `running` on a worker that no longer beats
(heartbeat.py), are suspects. A suspect found so in two consecutive rounds with the same record
(status, deliveries, times reconciled: keys.py RECONCILE_SUSPECTS_KEY, shared by the fleet, so
the two rounds may run on different workers) gets a fresh one-task message from the copy,
pushed by lua/task_reconcile.lua only if its record still reads the same. Two rounds, because a
message between BRPOP and the unacked write is in neither place for a moment: by the next round
it is in unacked, or its task started (deliveries changed).

Bounds. A lost task is pushed again between RECONCILE_AFTER_SECONDS + one period and that +
two periods (plus the lock's jitter) after its acceptance or its loss; a message that was not
lost after all (held in memory by a live worker for two rounds) is run twice, counted in the
record's `deliveries` and `reconciled` and in `dispatcher_tasks_reconciled_total`. A round scans
at most MAX_CANDIDATES open tasks (the oldest); the rest wait for the next rounds.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from celery.signals import worker_ready, worker_shutdown
from kombu.transport.redis import Channel

from shared.celery_app import encode_message
from shared.models import TaskStatus
from shared.priorities import ALL_QUEUES, Priority, queue_of
from shared.redis_connect import sync_client
from shared.redis_state.keys import (
    LIVE_BEATS,
    OPEN_KEY,
    RECONCILE_LOCK_KEY,
    RECONCILE_SUSPECTS_KEY,
    WORKERS_KEY,
    message_key,
    task_key,
)
from shared.redis_state.reconcile_scripts import ReconcileTask
from shared.settings import Settings, get_settings
from worker import task_metrics as metrics

log = logging.getLogger(__name__)

# The oldest open tasks one round looks at; messages read from a list per LRANGE.
MAX_CANDIDATES = 10_000
PAGE = 500
# The suspects of a round are forgotten after this many periods without a round.
SUSPECT_PERIODS = 10
_OPEN = (TaskStatus.queued.value, TaskStatus.running.value)
_FIELDS = ("status", "deliveries", "reconciled", "worker", "priority", "message")


def task_ids(envelope: Mapping[str, Any]) -> list[str]:
    """The task ids a kombu envelope (as LPUSHed; shared/celery_app.py) carries; [] for a
    message that is no prediction message."""
    try:
        _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        return [str(task["id"]) for task in kwargs.get("tasks") or ()]
    except (KeyError, TypeError, ValueError):
        return []


def held_task_ids(client: redis.Redis) -> set[str]:
    """Every task id in a message of the classes' queues, then of kombu's unacked hash. In this
    order: a message BRPOPed after its list was read is in unacked by the time that is read
    (but for the moment in between; hence two rounds)."""
    held: set[str] = set()
    for queue in ALL_QUEUES:
        start = 0
        while page := client.lrange(queue, start, start + PAGE - 1):
            for raw in page:
                held.update(task_ids(json.loads(raw)))
            start += PAGE
    for _, raw in client.hscan_iter(Channel.unacked_key, count=PAGE):
        message = json.loads(raw)  # [envelope, exchange, routing key]
        held.update(task_ids(message[0]))
    return held


@dataclass(frozen=True, slots=True)
class OpenTask:
    """An open task's record, as far as a round reads it."""

    task_id: str
    status: str
    deliveries: str
    reconciled: str
    worker: str
    priority: str
    message: str

    @classmethod
    def of(cls, task_id: str, values: Iterable[str | None]) -> OpenTask:
        return cls(task_id, *(value or "" for value in values))

    @property
    def seen(self) -> str:
        """What task_reconcile compares: the record has not moved since it was seen."""
        return f"{self.status}:{self.deliveries or '0'}:{self.reconciled or '0'}"

    def lost(self, held: set[str], live: set[str]) -> bool:
        """In no message anyone holds, and no live worker runs it."""
        if self.task_id in held:
            return False
        return self.status == TaskStatus.queued.value or self.worker not in live


@dataclass(slots=True)
class Round:
    """What one round found and did (the tests read it; the log says the rest)."""

    candidates: int = 0
    suspects: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # task id -> task_reconcile's reply

    @property
    def requeued(self) -> list[str]:
        return [task for task, outcome in self.outcomes.items() if outcome == "requeued"]


class Reconciler:
    """Rounds on one sync client; `tick` runs one when this worker takes the fleet's lock."""

    def __init__(self, client: redis.Redis, settings: Settings, name: str) -> None:
        """`client` decodes replies."""
        self.client = client
        self.name = name
        self.after = settings.reconcile_after_seconds
        self.period = settings.reconcile_period_seconds
        self.live_for = LIVE_BEATS * settings.worker_heartbeat_interval
        self._reconcile = ReconcileTask(client)
        self._primary: tuple[str, int] | None = None

    def tick(self) -> Round | None:
        """One round, if no other worker ran one within the last period; else None."""
        token = f"{self.name}:{time.time():.3f}"
        lock_ms = max(1, int(self.period * 900))  # rounds at least ~a period apart, fleet-wide
        if not self.client.set(RECONCILE_LOCK_KEY, token, nx=True, px=lock_ms):
            return None
        if self._primary_moved():
            # The last round may have read another node (its queues, mid-resync); its suspects
            # prove nothing here: start over on this primary.
            self.client.delete(RECONCILE_SUSPECTS_KEY)
            return Round()
        return self.run_round()

    def _primary_moved(self) -> bool:
        """On Sentinel, ask the sentinels now, so that this round reads the primary alone:
        redis-py's pool then drops its idle connections to any other node (without this, one
        kept on a demoted primary read its stale or resyncing queues: every old open task
        looked lost, 350 pushed again in one double-failover run). True when the primary is
        not the one the last round read."""
        ask = getattr(self.client.connection_pool, "get_master_address", None)
        if ask is None:  # one server
            return False
        host, port = ask()
        primary, self._primary = self._primary, (str(host), int(port))
        return primary is not None and primary != self._primary

    def run_round(self, now: float | None = None) -> Round:
        now = time.time() if now is None else now
        found = Round()
        ids = self.client.zrangebyscore(OPEN_KEY, "-inf", now - self.after, 0, MAX_CANDIDATES)
        tasks = self._open_records(cast(list[str], ids))
        found.candidates = len(tasks)
        if not tasks:
            self.client.delete(RECONCILE_SUSPECTS_KEY)
            return found
        held = held_task_ids(self.client)
        live_since = now - self.live_for
        live = set(cast(list[str], self.client.zrangebyscore(WORKERS_KEY, live_since, "+inf")))
        lost = [task for task in tasks if task.lost(held, live)]
        found.suspects = [task.task_id for task in lost]
        previous = self._remember(lost)
        for task in lost:
            if previous.get(task.task_id) == task.seen:
                found.outcomes[task.task_id] = self._requeue(task, live_since)
        return found

    def _open_records(self, ids: list[str]) -> list[OpenTask]:
        """The records of `ids` still open; the others leave the index."""
        if not ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hmget(task_key(task_id), _FIELDS)
            rows = pipe.execute()
        tasks = [OpenTask.of(task_id, row) for task_id, row in zip(ids, rows, strict=True)]
        ended = [task.task_id for task in tasks if task.status not in _OPEN]
        if ended:  # expired records, or ended by a script from before the index
            self.client.zrem(OPEN_KEY, *ended)
        return [task for task in tasks if task.status in _OPEN]

    def _remember(self, lost: list[OpenTask]) -> dict[str, str]:
        """This round's suspects replace the last round's, which are returned."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(RECONCILE_SUSPECTS_KEY)
            pipe.delete(RECONCILE_SUSPECTS_KEY)
            if lost:
                pipe.hset(RECONCILE_SUSPECTS_KEY, mapping={t.task_id: t.seen for t in lost})
                pipe.expire(RECONCILE_SUSPECTS_KEY, int(SUSPECT_PERIODS * self.period) + 1)
            previous: dict[str, str] = pipe.execute()[0]
        return previous

    def _requeue(self, task: OpenTask, live_since: float) -> str:
        """A fresh message for `task` alone, from the copy of the message it came in."""
        body = self.client.hget(message_key(task.message), "body") if task.message else None
        entry = _entry(cast(str, body), task.task_id) if body else None
        if entry is None:  # accepted before the copies were kept, or its copy expired
            log.warning("task %s is lost and cannot be enqueued again: no copy", task.task_id)
            return "no_copy"
        queue = queue_of(Priority(task.priority))
        message = encode_message([entry], queue=queue)
        outcome = self._reconcile(
            task.task_id, seen=task.seen, live_since=live_since, message=message
        )
        if outcome == "requeued":
            metrics.count_reconciled(task.priority)
            log.warning(
                "task %s enqueued again: its message was in no queue and held by no live "
                "worker (%s, %s deliveries)",
                task.task_id,
                task.status,
                task.deliveries or "0",
            )
        return outcome


def _entry(body: str, task_id: str) -> dict[str, Any] | None:
    """The task's entry ({"id", "call", "headers"}) in a stored message's envelope."""
    try:
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(body)["body"]))
    except (KeyError, TypeError, ValueError):
        return None
    for entry in kwargs.get("tasks") or ():
        if entry.get("id") == task_id:
            return dict(entry)
    return None


class ReconcilerThread:
    """Ticks every period (±10%, so the fleet's workers do not all ask at once) until stopped."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = self.reconciler.period
        while not self._stop.wait(period * random.uniform(0.9, 1.1)):  # noqa: S311 - jitter
            try:
                found = self.reconciler.tick()
            except redis.RedisError as error:
                log.warning("reconcile round failed: %s", type(error).__name__)
                continue
            except Exception:
                log.exception("reconcile round crashed")
                continue
            if found is not None and found.suspects:
                log.info("reconcile round: %d suspect(s) of %d", len(found.suspects),
                         found.candidates)  # fmt: skip


_running: dict[str, ReconcilerThread] = {}


@worker_ready.connect  # type: ignore[untyped-decorator]
def start_reconciler(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    if settings.reconcile_period_seconds <= 0:
        return
    client = sync_client(settings, socket_timeout=10, socket_connect_timeout=5,
                         decode_responses=True)  # fmt: skip
    name = getattr(sender, "hostname", None) or f"{os.getpid()}@{socket.gethostname()}"
    thread = ReconcilerThread(Reconciler(client, settings, name))
    _running["thread"] = thread
    thread.start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def stop_reconciler(**_: Any) -> None:
    if thread := _running.pop("thread", None):
        thread.stop()
