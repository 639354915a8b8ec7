"""`Dispatcher`: the synchronous client, a driver of the flows in `_flows.py`."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from . import _flows as flows
from ._models import BackendInfo, BatchInfo, BatchResult, TaskInfo
from ._retry import RetryPolicy
from ._stream import StreamEvent, StreamSession
from ._wire import Call, Dispatch, Flow, Sleep, build_request, client_headers

T = TypeVar("T")


class Dispatcher:
    """A model-dispatcher client: `with Dispatcher("http://127.0.0.1:8000") as client: ...`.

    `api_key` is sent as `Authorization: Bearer`. `timeout` (seconds) bounds each HTTP exchange;
    waits the server is asked to hold (sync dispatch, long polls) are added to its read part.
    `retry` bounds the retries of 429/503 and connection failures. `transport` replaces the
    network (tests pass an `httpx.MockTransport`).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._timeout = httpx.Timeout(timeout)
        self._http = httpx.Client(
            base_url=base_url,
            headers=client_headers(api_key, headers),
            timeout=self._timeout,
            transport=transport,
        )

    # --- predictions ----------------------------------------------------------------------------

    def predict(
        self,
        model_name: str,
        input: Any = None,
        *,
        data: bytes | None = None,
        content_type: str | None = None,
        version: str | None = None,
        backend: str | None = None,
        operation: str | None = None,
        wait: float | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> Any:
        """Run a prediction and return its value: parsed JSON, text, or `Binary` bytes.

        `input` is sent as JSON; `data` (bytes, with `content_type`) as the raw body. `wait`
        bounds how long to wait for the answer (None: until the task ends; then `WaitTimeout`,
        whose `task_id` you can re-attach to); `timeout` is the task's deadline on the server.
        `backend` names a configured model server (`backends()` lists them; None: the server's
        default) and `operation` the call on it (torchserve `predictions`/`explanations`, oip
        `infer`/`generate`, openai `chat.completions`/`completions`/`embeddings`; None: the
        protocol's default); `input` is then that protocol's own request body.
        Other request fields (`webhook`, `priority`, `input_media_type`...) go in `fields`.
        Failures raise the `DispatcherError` subclass of their code.
        """
        request = Dispatch(
            model_name, input, data, content_type, version, timeout, fields, backend, operation
        )
        return self._run(flows.predict(request, wait, self.retry))

    def submit(
        self,
        model_name: str,
        input: Any = None,
        *,
        data: bytes | None = None,
        content_type: str | None = None,
        version: str | None = None,
        backend: str | None = None,
        operation: str | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> Task:
        """Enqueue a prediction without waiting: a `Task` to follow, wait for or cancel."""
        request = Dispatch(
            model_name, input, data, content_type, version, timeout, fields, backend, operation
        )
        return Task(self, self._run(flows.submit(request, self.retry)))

    def task(self, task_id: str) -> Task:
        """Re-attach to a task submitted earlier (e.g. after a `WaitTimeout`)."""
        return Task(self, task_id)

    def retry_task(self, task_id: str) -> Task:
        """Run a failed, expired or canceled task again: a new task with the same request and
        payload (its `TaskInfo.retry_of` is `task_id`). A task is retried once: retrying it
        again returns that same new task. `Conflict` (409) when it cannot be retried (not
        failed, expired or canceled; or its request is no longer kept on the server). Named
        `retry_task`, as `retry` is the client's `RetryPolicy`."""
        return Task(self, self._run(flows.retry(task_id, self.retry)).task_id)

    def stream(
        self,
        model_name: str | None = None,
        input: Any = None,
        *,
        task_id: str | None = None,
        last_event_id: str | None = None,
        raise_on_error: bool = False,
        data: bytes | None = None,
        content_type: str | None = None,
        version: str | None = None,
        backend: str | None = None,
        operation: str | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> EventStream:
        """Submit a prediction with `stream: true` (the arguments of `submit`) or, with
        `task_id=`, follow a task submitted earlier; iterate the result for its `StreamEvent`s.

        The submission happens now (errors raise here); the stream is read as you iterate and
        reconnects by itself with `Last-Event-ID` (see `_stream.py`), so every event comes once.
        It ends after the `done` or `error` event. `raise_on_error=True` raises the task's
        error (and `TaskCanceled` for a canceled task's `done`) instead of yielding it.
        `last_event_id` resumes after an event seen elsewhere.
        """
        if (model_name is None) == (task_id is None):
            raise ValueError("pass either model_name (a new prediction) or task_id, not both")
        if task_id is None:
            assert model_name is not None
            extra = {**fields, "stream": True}
            request = Dispatch(
                model_name, input, data, content_type, version, timeout, extra, backend, operation
            )
            task_id = self._run(flows.submit(request, self.retry))
        return EventStream(self, StreamSession(task_id, self.retry, last_event_id), raise_on_error)

    # --- batches --------------------------------------------------------------------------------

    def batch(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        webhook: str | None = None,
        webhook_events: Iterable[str] | None = None,
    ) -> Batch:
        """Submit many predictions at once: each request is a dict with `custom_id`,
        `model_name` and `input` or `data` (bytes with `content_type`, or a data URI), plus any
        other dispatch field (`backend`, `operation`...). The whole batch is validated before
        anything runs."""
        options = {"webhook": webhook, "webhook_events": list(webhook_events or [])}
        info = self._run(flows.batch(requests, options, self.retry))
        return Batch(self, info.batch_id, info)

    # --- discovery ------------------------------------------------------------------------------

    def backends(self) -> list[BackendInfo]:
        """The model servers the service is configured with: name, protocol, health, the
        operations and the models each reports (what `backend=` and `operation=` may name)."""
        return self._run(flows.backends(self.retry))

    def get_batch(self, batch_id: str) -> Batch:
        """Re-attach to a batch submitted earlier."""
        return Batch(self, batch_id)

    # --- plumbing -------------------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        """Drive a flow: send its calls, sleep its sleeps, throw transport errors into it."""
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    reply = self._send(step)
                except httpx.TransportError as error:
                    step = flow.throw(error)
                else:
                    step = flow.send(reply)
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            flow.close()

    def _send(self, call: Call) -> httpx.Response:
        response = self._http.send(build_request(self._http, call, self._timeout), stream=True)
        if not call.stream or not response.is_success:
            try:
                response.read()
            finally:
                response.close()
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Task:
    """A submitted prediction."""

    def __init__(self, client: Dispatcher, task_id: str) -> None:
        self._client = client
        self.task_id = task_id

    def status(self, wait: float = 0.0) -> TaskInfo:
        """The task's state now, or once it ends within `wait` seconds (a long poll)."""
        return self._client._run(flows.status(self.task_id, self._client.retry, wait))

    def result(self, timeout: float | None = None) -> Any:
        """Wait (long polls; at most `timeout` s, None: until it ends) and return the value,
        or raise the task's error (`WaitTimeout` when `timeout` ran out first)."""
        return self._client._run(flows.result(self.task_id, timeout, self._client.retry))

    def cancel(self) -> TaskInfo:
        """Cancel: a queued task never runs; a running one finishes (`cancel_requested`)."""
        return self._client._run(flows.cancel(self.task_id, self._client.retry))

    def retry(self) -> Task:
        """This task run again (see `Dispatcher.retry_task`)."""
        return self._client.retry_task(self.task_id)

    def stream(
        self, *, last_event_id: str | None = None, raise_on_error: bool = False
    ) -> EventStream:
        """The task's events (see `Dispatcher.stream`); the task must have been submitted with
        `stream=True`."""
        return self._client.stream(
            task_id=self.task_id, last_event_id=last_event_id, raise_on_error=raise_on_error
        )

    def __repr__(self) -> str:
        return f"Task({self.task_id!r})"


class EventStream:
    """A task's events as they come: `for event in client.stream(...)`, or `with` it to close
    the connection early. `task_id` is the task; `last_event_id` where a resume would start."""

    def __init__(self, client: Dispatcher, session: StreamSession, raise_on_error: bool) -> None:
        self._client = client
        self._session = session
        self._raise = raise_on_error
        self._events = self._run()

    @property
    def task_id(self) -> str:
        return self._session.task_id

    @property
    def last_event_id(self) -> str:
        return self._session.last_event_id

    def __iter__(self) -> Iterator[StreamEvent]:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop reading: the open connection is closed (the task itself goes on)."""
        self._events.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> Generator[StreamEvent, None, None]:
        while not self._session.finished:
            delay = yield from self._connection()
            if delay is not None:
                time.sleep(delay)

    def _connection(self) -> Generator[StreamEvent, None, float | None]:
        """One connection's events; then None (the stream ended) or the delay to reconnect."""
        session, http = self._session, self._client._http
        request = build_request(http, session.call(), self._client._timeout)
        try:
            response = http.send(request, stream=True)
        except httpx.TransportError as error:
            return session.dropped(error)
        try:
            if not response.is_success:
                response.read()
            delay = session.opened(response)
            if delay is not None:
                return delay
            for chunk in response.iter_bytes():
                for event in session.feed(chunk):
                    if self._raise:
                        event.raise_for_error()
                    yield event
                if session.finished:
                    return None
        except httpx.TransportError as error:
            return session.dropped(error)
        finally:
            response.close()
        return session.ended()


class Batch:
    """A submitted batch. `info` is its state as last seen."""

    def __init__(self, client: Dispatcher, batch_id: str, info: BatchInfo | None = None) -> None:
        self._client = client
        self.batch_id = batch_id
        self.info = info

    def status(self, wait: float = 0.0) -> BatchInfo:
        """The batch's status and counts, or once it ends within `wait` seconds."""
        self.info = self._client._run(flows.batch_status(self.batch_id, self._client.retry, wait))
        return self.info

    def wait(self, timeout: float | None = None) -> BatchInfo:
        """Long-poll until the batch ends (`WaitTimeout` after `timeout` s)."""
        self.info = self._client._run(flows.batch_wait(self.batch_id, timeout, self._client.retry))
        return self.info

    def results(self) -> Iterator[BatchResult]:
        """Every item's outcome in input order, streamed; unfinished items show their status."""
        response = self._client._run(flows.batch_results(self.batch_id, self._client.retry))
        try:
            for line in response.iter_lines():
                item = flows.result_line(line)
                if item is not None:
                    yield item
        finally:
            response.close()

    def cancel(self) -> BatchInfo:
        """Cancel the queued items; running ones finish."""
        self.info = self._client._run(flows.batch_cancel(self.batch_id, self._client.retry))
        return self.info

    def __repr__(self) -> str:
        return f"Batch({self.batch_id!r})"
