"""dispatcher_client's `stream()` against a fake event stream (httpx.MockTransport): resuming
with Last-Event-ID after a dropped connection or a 5xx (every event exactly once), keep-alives,
restarts, error and done events, the bounds on reconnecting; sync and async. The SSE parser
itself: test_sse.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import dispatcher_client as dc
import httpx
import pytest
from dispatcher_client import AsyncDispatcher, Dispatcher, StreamEvent

from tests.support.client_fakes import BASE, FAST, TASK, accepted, error, task_body

STREAM_PATH = f"/tasks/{TASK}/stream"


def sse(kind: str, event_id: str, data: Any) -> bytes:
    return f"event: {kind}\r\nid: {event_id}\r\ndata: {json.dumps(data)}\r\n\r\n".encode()


def history(chunks: int = 5) -> list[tuple[str, bytes]]:
    """A task's stream: `chunks` outputs, then done; ids as Redis writes them."""
    events = [
        (f"1700000000000-{n}", sse("output", f"1700000000000-{n}", {"token": f"t{n}"}))
        for n in range(chunks)
    ]
    done = task_body(prediction_value="".join(f"t{n}" for n in range(chunks)))
    events.append(("1700000000001-0", sse("done", "1700000000001-0", done)))
    return events


@dataclass
class Connection:
    """What one connection does: `status` (a 5xx answers that, no stream); `drop_after`
    events, then `cut` bytes of the next one, then the connection fails (None: no drop)."""

    status: int = 200
    drop_after: int | None = None
    cut: int = 0
    replay: bool = False  # ignore Last-Event-ID and send everything again (a faulty proxy)
    close_early: bool = False  # end the body cleanly after drop_after events (no error)


@dataclass
class StreamServer:
    """A scripted `/tasks/{id}/stream`, sync or async; records each request's Last-Event-ID."""

    events: list[tuple[str, bytes]]
    plan: list[Connection] = field(default_factory=list)
    is_async: bool = False
    keepalive: bytes = b": keep-alive\n\n"
    last_ids: list[str | None] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "POST":
            return accepted()
        assert request.url.path == STREAM_PATH
        last = request.headers.get("last-event-id")
        self.last_ids.append(last)
        plan = self.plan.pop(0) if self.plan else Connection()
        if plan.status != 200:
            return error(plan.status, "queue_unavailable")
        ids = [event_id for event_id, _ in self.events]
        start = 0 if last is None or plan.replay else ids.index(last) + 1
        body = [self.keepalive]
        pending = self.events[start:]
        for n, (_, raw) in enumerate(pending):
            if plan.drop_after is not None and n == plan.drop_after:
                if plan.cut:
                    body.append(raw[: plan.cut])
                break
            body.extend([raw, self.keepalive])
        fail = plan.drop_after is not None and not plan.close_early
        headers = {"Content-Type": "text/event-stream; charset=utf-8"}
        stream = _async_body(body, fail) if self.is_async else _sync_body(body, fail)
        return httpx.Response(200, headers=headers, content=stream)


def _sync_body(parts: list[bytes], fail: bool) -> Iterator[bytes]:
    yield from parts
    if fail:
        raise httpx.ReadError("connection reset by peer")


async def _async_body(parts: list[bytes], fail: bool) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if fail:
        raise httpx.ReadError("connection reset by peer")


def client_for(server: StreamServer, retry: dc.RetryPolicy = FAST) -> Dispatcher:
    return Dispatcher(BASE, "key-1", retry=retry, transport=httpx.MockTransport(server))


def run_async(server: StreamServer, **kwargs: Any) -> list[StreamEvent]:
    server.is_async = True

    async def main() -> list[StreamEvent]:
        transport = httpx.MockTransport(server)
        async with AsyncDispatcher(BASE, retry=FAST, transport=transport) as client:
            return [event async for event in await client.stream(**kwargs)]

    return asyncio.run(main())


def tokens(events: list[StreamEvent]) -> list[str]:
    return [event.data["token"] for event in events if event.kind == "output"]


# --- submitting and reading ----------------------------------------------------------------------


def test_stream_submits_with_stream_true_then_reads_the_events() -> None:
    server = StreamServer(history(3))
    with client_for(server) as client:
        events = list(client.stream("llm", {"prompt": "hi"}, backend="llama", operation="x"))
    post, get = server.requests
    assert json.loads(post.content) == {
        "model_name": "llm",
        "input": {"prompt": "hi"},
        "stream": True,
        "backend": "llama",
        "operation": "x",
    }
    assert post.headers["prefer"] == "respond-async"
    assert get.headers["accept"] == "text/event-stream"
    assert "last-event-id" not in get.headers
    assert [event.kind for event in events] == ["output", "output", "output", "done"]
    assert tokens(events) == ["t0", "t1", "t2"]
    done = events[-1]
    assert done.final
    assert done.task is not None
    assert done.task.prediction_value == "t0t1t2"
    assert done.id == "1700000000001-0"


def test_keepalive_comments_are_not_events() -> None:
    server = StreamServer(history(2), keepalive=b":\r\n: ping\r\n\r\n: x\r\r")
    with client_for(server) as client:
        events = list(client.stream(task_id=TASK))
    assert [event.kind for event in events] == ["output", "output", "done"]


def test_stream_needs_exactly_one_of_model_name_and_task_id() -> None:
    with client_for(StreamServer(history())) as client:
        with pytest.raises(ValueError, match="either"):
            client.stream()
        with pytest.raises(ValueError, match="either"):
            client.stream("llm", task_id=TASK)


# --- resuming -------------------------------------------------------------------------------------


def test_a_connection_dropped_mid_event_resumes_after_the_last_whole_event() -> None:
    # The third event is cut half-way: it is not yielded from the broken connection, and the
    # reconnection asks for what follows the second, so it comes once, whole.
    server = StreamServer(history(5), [Connection(drop_after=2, cut=20)])
    with client_for(server) as client:
        stream = client.stream(task_id=TASK)
        events = list(stream)
    assert server.last_ids == [None, "1700000000000-1"]
    assert tokens(events) == ["t0", "t1", "t2", "t3", "t4"]
    ids = [event.id for event in events]
    assert len(ids) == len(set(ids)) == 6
    assert stream.last_event_id == "1700000000001-0"


def test_repeated_drops_resume_each_time_and_progress_resets_the_retry_budget() -> None:
    # Six drops in a row, each after one event: more than FAST's 4 attempts, yet each
    # connection made progress, so the stream goes on to the end.
    plan = [Connection(drop_after=1, cut=5) for _ in range(6)]
    server = StreamServer(history(6), plan)
    with client_for(server) as client:
        events = list(client.stream(task_id=TASK))
    assert tokens(events) == [f"t{n}" for n in range(6)]
    assert server.last_ids == [None] + [f"1700000000000-{n}" for n in range(6)]


def test_a_stream_that_ends_before_done_is_resumed() -> None:
    server = StreamServer(history(3), [Connection(drop_after=2, close_early=True)])
    with client_for(server) as client:
        events = list(client.stream(task_id=TASK))
    assert tokens(events) == ["t0", "t1", "t2"]
    assert server.last_ids == [None, "1700000000000-1"]


def test_a_5xx_is_retried_with_the_last_event_id() -> None:
    plan = [Connection(drop_after=1), Connection(status=503), Connection(status=502)]
    server = StreamServer(history(3), plan)
    with client_for(server) as client:
        events = list(client.stream(task_id=TASK))
    assert tokens(events) == ["t0", "t1", "t2"]
    assert server.last_ids == [None, "1700000000000-0", "1700000000000-0", "1700000000000-0"]


def test_a_replayed_history_is_never_yielded_twice() -> None:
    plan = [Connection(drop_after=3), Connection(replay=True)]
    server = StreamServer(history(4), plan)
    with client_for(server) as client:
        events = list(client.stream(task_id=TASK))
    assert tokens(events) == ["t0", "t1", "t2", "t3"]
    assert len(events) == 5


def test_last_event_id_resumes_a_stream_read_elsewhere() -> None:
    server = StreamServer(history(4))
    with client_for(server) as client:
        events = list(client.task(TASK).stream(last_event_id="1700000000000-1"))
    assert server.last_ids == ["1700000000000-1"]
    assert tokens(events) == ["t2", "t3"]


def test_reconnecting_without_progress_is_bounded() -> None:
    server = StreamServer(history(2), [Connection(drop_after=0) for _ in range(10)])
    with client_for(server) as client, pytest.raises(dc.TransportError) as caught:
        list(client.stream(task_id=TASK))
    assert len(server.last_ids) == FAST.max_attempts
    assert caught.value.task_id == TASK


def test_persistent_503s_raise_the_service_error_after_the_retries() -> None:
    server = StreamServer(history(2), [Connection(status=503) for _ in range(10)])
    with client_for(server) as client, pytest.raises(dc.ServiceUnavailable):
        list(client.stream(task_id=TASK))
    assert len(server.last_ids) == FAST.max_attempts


def test_a_4xx_is_not_retried() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return error(404, "task_not_found", TASK)

    with (
        Dispatcher(BASE, retry=FAST, transport=httpx.MockTransport(handler)) as client,
        pytest.raises(dc.TaskNotFound),
    ):
        list(client.stream(task_id=TASK))


def test_a_success_that_is_not_an_event_stream_is_unexpected() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=task_body())

    with (
        Dispatcher(BASE, retry=FAST, transport=httpx.MockTransport(handler)) as client,
        pytest.raises(dc.UnexpectedResponse, match="not an event stream"),
    ):
        list(client.stream(task_id=TASK))


# --- restart, error, done -------------------------------------------------------------------------


def failing_history() -> list[tuple[str, bytes]]:
    body = {"status": 502, "msg": "the stream ended without [DONE]", "code": "backend_error"}
    return [
        ("1-0", sse("output", "1-0", "Hel")),
        ("2-0", sse("restart", "2-0", {"attempt": 2})),
        ("2-1", sse("output", "2-1", "Hello")),
        ("3-0", sse("error", "3-0", body)),
    ]


def test_restart_and_error_events_are_surfaced() -> None:
    with client_for(StreamServer(failing_history())) as client:
        events = list(client.stream(task_id=TASK))
    assert [event.kind for event in events] == ["output", "restart", "output", "error"]
    assert events[0].data == "Hel"
    assert events[1].attempt == 2
    error_event = events[-1]
    assert isinstance(error_event.error, dc.ModelFailed)
    assert error_event.error.code == "backend_error"
    assert error_event.error.task_id == TASK


def test_raise_on_error_raises_the_task_error_after_the_output() -> None:
    seen: list[str] = []

    def read(stream: Iterator[StreamEvent]) -> None:
        for event in stream:
            seen.append(event.kind)

    with (
        client_for(StreamServer(failing_history())) as client,
        pytest.raises(dc.ModelFailed, match="without") as caught,
    ):
        read(client.stream(task_id=TASK, raise_on_error=True))
    assert seen == ["output", "restart", "output"]
    assert caught.value.task_id == TASK


def test_raise_on_error_raises_task_canceled_for_a_canceled_done() -> None:
    canceled = task_body("canceled", cancel_requested=True)
    server = StreamServer([("1-0", sse("done", "1-0", canceled))])
    with client_for(server) as client:
        assert [e.task.status for e in client.stream(task_id=TASK) if e.task] == ["canceled"]
        with pytest.raises(dc.TaskCanceled):
            list(client.stream(task_id=TASK, raise_on_error=True))


def test_closing_the_stream_early_stops_reading() -> None:
    server = StreamServer(history(5))
    with client_for(server) as client, client.stream(task_id=TASK) as stream:
        first = next(stream)
    assert first.data == {"token": "t0"}
    with pytest.raises(StopIteration):
        next(stream)
    assert len(server.last_ids) == 1


# --- async ----------------------------------------------------------------------------------------


def test_async_stream_submits_and_resumes_after_a_drop() -> None:
    server = StreamServer(history(5), [Connection(drop_after=3, cut=11)])
    events = run_async(server, model_name="llm", input={"prompt": "hi"})
    assert json.loads(server.requests[0].content)["stream"] is True
    assert server.last_ids == [None, "1700000000000-2"]
    assert tokens(events) == ["t0", "t1", "t2", "t3", "t4"]
    assert [event.kind for event in events][-1] == "done"


def test_async_keepalives_restarts_and_5xx() -> None:
    plan = [Connection(drop_after=1), Connection(status=503)]
    server = StreamServer(failing_history(), plan, keepalive=b":\n\n")
    events = run_async(server, task_id=TASK)
    assert [event.kind for event in events] == ["output", "restart", "output", "error"]
    assert events[1].attempt == 2
    assert server.last_ids == [None, "1-0", "1-0"]


def test_async_raise_on_error() -> None:
    with pytest.raises(dc.ModelFailed):
        run_async(StreamServer(failing_history()), task_id=TASK, raise_on_error=True)


def test_async_reconnecting_without_progress_is_bounded() -> None:
    server = StreamServer(history(2), [Connection(drop_after=0) for _ in range(10)])
    with pytest.raises(dc.TransportError):
        run_async(server, task_id=TASK)
    assert len(server.last_ids) == FAST.max_attempts


def test_a_wait_longer_than_max_elapsed_ends_the_retries_at_once() -> None:
    # Retry-After of 100 s (a 503) or the stream's own `retry: 60000` (a drop) would overrun
    # FAST's 10 s budget: no sleeping in vain, the failure comes after one connection.
    def refused(request: httpx.Request) -> httpx.Response:
        return error(503, "queue_unavailable", **{"Retry-After": "100"})

    with (
        Dispatcher(BASE, retry=FAST, transport=httpx.MockTransport(refused)) as client,
        pytest.raises(dc.ServiceUnavailable) as caught,
    ):
        list(client.stream(task_id=TASK))
    assert caught.value.retry_after == 100
    server = StreamServer([("1-0", b"retry: 60000\n\n" + sse("output", "1-0", "a"))])
    server.plan = [Connection(drop_after=1)]
    with client_for(server) as client, pytest.raises(dc.TransportError):
        list(client.stream(task_id=TASK))
    assert server.last_ids == [None]


def test_a_204_after_the_final_event_ends_the_stream_without_retrying() -> None:
    # The service's answer to a Last-Event-ID that already is the stream's done (what tells an
    # EventSource to stop reconnecting).
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        return httpx.Response(204)

    with Dispatcher(BASE, retry=FAST, transport=httpx.MockTransport(handler)) as client:
        assert list(client.stream(task_id=TASK, last_event_id="1700000000001-0")) == []
    assert seen == ["1700000000001-0"]

    async def main() -> list[StreamEvent]:
        transport = httpx.MockTransport(handler)
        async with AsyncDispatcher(BASE, retry=FAST, transport=transport) as client:
            return [event async for event in await client.stream(task_id=TASK, last_event_id="1-0")]

    assert asyncio.run(main()) == []
    assert seen == ["1700000000001-0", "1-0"]
