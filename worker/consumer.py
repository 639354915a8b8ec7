"""How prediction messages reach the engine: the task's Celery strategy, and a consumer step.

Celery runs a task's body in a pool (a thread or a child process per running task), which would
bound a process's calls by its threads again. So the prediction task has its own strategy
(Celery's documented `Task.Strategy` hook): the consumer, on its own event loop, hands each
message to the engine (worker/engine.py) and returns to fetching; the engine acks the message
through the consumer once all its tasks ended. Celery's pool runs nothing for these messages:
`--concurrency` no longer bounds the calls, `WORKER_MAX_IN_FLIGHT` does.

`EngineStep`, a consumer bootstep after Celery's `Tasks` step:
- on every (re)start of the consumer, the channel's `can_consume` becomes the engine's
  `has_room`: no message is fetched while the process holds `WORKER_MAX_IN_FLIGHT` tasks (this
  replaces `worker_disable_prefetch`'s check, which counts Celery's pool);
- on shutdown (not on a reconnect), before `Tasks` closes the channel and gives the unacked
  messages back: the engine drains (running calls finish and are acked, no new one starts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from celery import bootsteps, signals

from shared import heap
from shared.celery_app import TASK_PREDICT_MANY
from shared.settings import get_settings
from worker.app import app
from worker.engine import Engine
from worker.kombu_patches import leases

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
# Set once the consumer's loop has stopped: acks then go straight to the channel, as no loop is
# left to run the ones queued on it.
_draining = threading.Event()


def engine(worker_name: str = "") -> Engine:
    """This process's engine, started on first use (so a prefork child never starts one)."""
    with _lock:
        if not _engines:
            started = Engine(get_settings(), worker_name)
            started.start()
            _engines[""] = started
        return _engines[""]


def running_engine() -> Engine | None:
    """This process's engine if it started (the heartbeat reports its calls in flight)."""
    return _engines.get("")


def shutdown_engine(timeout: float) -> None:
    """Let the running calls finish (up to `timeout` s), start no new one, close the engine."""
    with _lock:
        runner = _engines.pop("", None)
    if runner is None:
        return
    if runner.held:
        log.info("letting %d held task(s) finish", runner.held)
    if not runner.drain(timeout):
        log.warning("calls still running at shutdown: their messages will be delivered again")
    runner.stop()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _warn_about_prefork(sender: Any = None, **_: Any) -> None:
    pool = getattr(getattr(sender, "controller", None), "pool", None) or getattr(sender, "pool", 0)
    if "prefork" in type(pool).__module__:
        log.warning(
            "--pool prefork: the engine runs every call in the main process, so the pool's "
            "child processes stay idle; use --pool threads"
        )


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _freeze_heap(**_: Any) -> None:
    # Start-up done (in the main process, and in each prefork child): what lives now lives until
    # exit; the cyclic collector need not walk it again (shared/heap.py).
    heap.freeze_startup_heap()


def _tasks_of(message: Any, body: Any) -> list[Mapping[str, Any]]:
    """The tasks of a protocol-2 message: its body is `[args, kwargs, embed]`."""
    _, kwargs, _ = message.decode() if body is None else body
    tasks: list[Mapping[str, Any]] = kwargs["tasks"]
    if not tasks:
        raise ValueError("a message without tasks")
    return tasks


def engine_strategy(task: Any, app: Any, consumer: Any, **_: Any) -> Any:
    """The prediction task's `Strategy`: each message to the engine, acked once its tasks ended."""
    runner = engine(consumer.hostname)
    errors = consumer.connection_errors
    log_tasks = get_settings().worker_log_tasks

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                   **__: Any) -> None:  # fmt: skip
        try:
            tasks = _tasks_of(message, body)
        except Exception:
            log.exception("a message that is no prediction message was dropped")
            ack(log, errors)
            return
        tag = str(message.delivery_tag)
        leases.hold(tag)
        message_id = message.headers.get("id", "?")
        if log_tasks:  # Celery's own lines for a task it runs, for the same tooling
            log.info("Task %s[%s] received", task.name, message_id)
        received = time.monotonic()

        def done(ended: bool) -> None:
            leases.release(tag)  # not ended: its lease runs out and it is delivered again
            if not ended:
                return
            if log_tasks:
                elapsed = time.monotonic() - received
                log.info("Task %s[%s] succeeded in %.3fs", task.name, message_id, elapsed)
            if _draining.is_set():
                message.ack_log_error(log, errors)
            else:
                ack(log, errors)  # queued on the consumer's loop, which acks on its own thread

        runner.submit(tasks, done)

    return on_message


class EngineStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Fetch only while the engine has room; drain it before the channel closes at shutdown."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        runner = engine(c.hostname)
        hub = c.hub
        runner.on_room = (lambda: hub.call_soon(_wake)) if hub is not None else _wake
        c.task_consumer.channel.qos.can_consume = runner.has_room

    def shutdown(self, c: Any) -> None:
        _draining.set()
        shutdown_engine(get_settings().task_time_limit)


def _wake() -> None:
    """Nothing: queued on the consumer's loop only to make it check `can_consume` again."""


app.steps["consumer"].add(EngineStep)


@app.task(name=TASK_PREDICT_MANY, bind=True, Strategy=f"{__name__}:engine_strategy")  # type: ignore[untyped-decorator]
def predict_many(self: Any, tasks: Sequence[Mapping[str, Any]]) -> None:
    """Run a message's tasks in this process's engine and wait (a worker never calls this: its
    strategy hands messages to the engine; for running a message by hand, as a test does)."""
    engine(getattr(self.request, "hostname", "") or "").run_sync(tasks)
