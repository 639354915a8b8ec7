"""lib.lua end_stream against a bare redis-server: every ending of a streamed task ends its
stream in the same step as its record (`done` for succeeded and canceled, `error` with the body
for failed and expired), a streamless task gets no stream, and a running streamed task's
cancel ends it at once, after which its worker's appends are refused."""

from __future__ import annotations

import json
import time

import redis

from shared.errors import BackendFailed, TaskCanceled
from shared.redis_state.keys import stream_key, task_key
from shared.redis_state.record import Outcome
from shared.redis_state.stream_scripts import AppendOutcome, AppendToStream, StreamLimits
from shared.redis_state.streams import StreamKind
from shared.redis_state.task_scripts import CancelTask
from tests.unit.shared.redis_state.make import (
    CANCELED,
    TTL,
    RunAsync,
    finish,
    start,
    submit,
    submit_task,
)

LIMITS = StreamLimits(max_entries=100, max_bytes=10_000, ttl=TTL)


def entries(r: redis.Redis, task_id: str) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(stream_key(task_id))]  # type: ignore[union-attr]


def append(run_async: RunAsync, task_id: str, data: str, attempt: int = 1) -> AppendOutcome:
    async def call(client):  # type: ignore[no-untyped-def]
        appended = await AppendToStream(client)(
            task_id, StreamKind.output, data, attempt=attempt, limits=LIMITS
        )
        return appended.outcome

    outcome: AppendOutcome = run_async(call)
    return outcome


def cancel(run_async: RunAsync, task_id: str, running_error: str = "") -> str:
    async def call(client):  # type: ignore[no-untyped-def]
        return await CancelTask(client)(
            task_id, now=time.time(), ttl=TTL, error=CANCELED, running_error=running_error
        )

    result: str = run_async(call)
    return result


def test_a_succeeded_streamed_task_ends_its_stream_with_done(
    r: redis.Redis, run_async: RunAsync
) -> None:
    submit(run_async, submit_task("t", stream=True))
    assert start(r, "t") == [("run", 1)]
    assert append(run_async, "t", '"a"') is AppendOutcome.appended
    assert finish(r, Outcome.succeeded("t", "a")) == [True]
    written = entries(r, "t")
    assert [e["kind"] for e in written] == ["output", "done"]
    assert (written[-1]["data"], written[-1]["attempt"], written[-1]["seq"]) == ("", "1", "1")
    assert 0 < r.ttl(stream_key("t")) <= r.ttl(task_key("t"))
    assert append(run_async, "t", '"late"') is AppendOutcome.ended


def test_a_failed_streamed_task_ends_with_its_error_body(
    r: redis.Redis, run_async: RunAsync
) -> None:
    submit(run_async, submit_task("f", stream=True))
    start(r, "f")
    finish(r, Outcome.failed("f", BackendFailed("the model server failed")))
    (ending,) = entries(r, "f")  # no output: the stream holds only its ending
    assert ending["kind"] == "error"
    body = json.loads(ending["data"])
    assert (body["code"], body["task_id"]) == ("backend_error", "f")


def test_expired_while_queued_is_an_error_and_canceled_while_queued_is_done(
    r: redis.Redis, run_async: RunAsync
) -> None:
    submit(
        run_async, submit_task("old", deadline_in=-1, stream=True), submit_task("q", stream=True)
    )
    assert start(r, "old") == [("expired", 1)]
    assert [(e["kind"], json.loads(e["data"])["code"]) for e in entries(r, "old")] == [
        ("error", "expired")
    ]
    assert cancel(run_async, "q") == "canceled"
    assert [(e["kind"], e["data"], e["attempt"]) for e in entries(r, "q")] == [("done", "", "0")]


def test_a_task_without_stream_gets_no_stream(r: redis.Redis, run_async: RunAsync) -> None:
    submit(run_async, submit_task("plain"))
    start(r, "plain")
    finish(r, Outcome.succeeded("plain", 1))
    assert r.exists(stream_key("plain")) == 0


def test_cancel_of_a_running_streamed_task_ends_it_at_once(
    r: redis.Redis, run_async: RunAsync
) -> None:
    submit(run_async, submit_task("s", stream=True), submit_task("n"))
    start(r, "s", "n")
    append(run_async, "s", '"x"')
    stopped = TaskCanceled("canceled while streaming").body("s").model_dump_json()
    assert cancel(run_async, "s", running_error=stopped) == "canceled"
    assert r.hget(task_key("s"), "status") == "canceled"
    assert json.loads(r.hget(task_key("s"), "error"))["msg"] == "canceled while streaming"  # type: ignore[arg-type]
    assert [e["kind"] for e in entries(r, "s")] == ["output", "done"]
    # Its worker's next chunk is refused (it stops the call); its outcome changes nothing.
    assert append(run_async, "s", '"y"') is AppendOutcome.ended
    assert finish(r, Outcome.succeeded("s", "xy")) == [False]
    assert r.hget(task_key("s"), "status") == "canceled"
    # A running task that does not stream is only flagged, as before.
    assert cancel(run_async, "n") == "cancel_requested"
    assert r.hget(task_key("n"), "status") == "running"
