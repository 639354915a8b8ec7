"""`AsyncDispatcher`: the asyncio client, the same flows as `Dispatcher` driven by httpx's
AsyncClient and asyncio.sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from . import _flows as flows
from ._models import BackendInfo, BatchInfo, BatchResult, TaskInfo
from ._retry import RetryPolicy
from ._stream import StreamEvent, StreamSession
from ._wire import Call, Dispatch, Flow, Sleep, build_request, client_headers

T = TypeVar("T")


class AsyncDispatcher:
    """`async with AsyncDispatcher(base_url, api_key) as client: await client.predict(...)`.

    Same arguments and methods as `Dispatcher`, awaited; `Batch.results()` is an async iterator.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._timeout = httpx.Timeout(timeout)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=client_headers(api_key, headers),
            timeout=self._timeout,
            transport=transport,
        )

    async def predict(
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
        timeout: float | None = None,  # noqa: ASYNC109  (the task's deadline on the server)
        **fields: Any,
    ) -> Any:
        """See `Dispatcher.predict`."""
        request = Dispatch(
            model_name, input, data, content_type, version, timeout, fields, backend, operation
        )
        return await self._run(flows.predict(request, wait, self.retry))

    async def submit(
        self,
        model_name: str,
        input: Any = None,
        *,
        data: bytes | None = None,
        content_type: str | None = None,
        version: str | None = None,
        backend: str | None = None,
        operation: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  (the task's deadline on the server)
        **fields: Any,
    ) -> AsyncTask:
        """See `Dispatcher.submit`."""
        request = Dispatch(
            model_name, input, data, content_type, version, timeout, fields, backend, operation
        )
        return AsyncTask(self, await self._run(flows.submit(request, self.retry)))

    def task(self, task_id: str) -> AsyncTask:
        return AsyncTask(self, task_id)

    async def retry_task(self, task_id: str) -> AsyncTask:
        """See `Dispatcher.retry_task`."""
        return AsyncTask(self, (await self._run(flows.retry(task_id, self.retry))).task_id)

    async def stream(
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
        timeout: float | None = None,  # noqa: ASYNC109  (the task's deadline on the server)
        **fields: Any,
    ) -> AsyncEventStream:
        """See `Dispatcher.stream`: `async for event in await client.stream(...)` (awaiting
        submits the prediction, so its errors raise there)."""
        if (model_name is None) == (task_id is None):
            raise ValueError("pass either model_name (a new prediction) or task_id, not both")
        if task_id is None:
            assert model_name is not None
            extra = {**fields, "stream": True}
            request = Dispatch(
                model_name, input, data, content_type, version, timeout, extra, backend, operation
            )
            task_id = await self._run(flows.submit(request, self.retry))
        session = StreamSession(task_id, self.retry, last_event_id)
        return AsyncEventStream(self, session, raise_on_error)

    async def batch(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        webhook: str | None = None,
        webhook_events: Iterable[str] | None = None,
    ) -> AsyncBatch:
        """See `Dispatcher.batch`."""
        options = {"webhook": webhook, "webhook_events": list(webhook_events or [])}
        info = await self._run(flows.batch(requests, options, self.retry))
        return AsyncBatch(self, info.batch_id, info)

    # --- discovery ------------------------------------------------------------------------------

    async def backends(self) -> list[BackendInfo]:
        """The model servers the service is configured with: name, protocol, health, the
        operations and the models each reports (what `backend=` and `operation=` may name)."""
        return await self._run(flows.backends(self.retry))

    def get_batch(self, batch_id: str) -> AsyncBatch:
        return AsyncBatch(self, batch_id)

    async def _run(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    reply = await self._send(step)
                except httpx.TransportError as error:
                    step = flow.throw(error)
                else:
                    step = flow.send(reply)
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            flow.close()  # cancelled mid-wait: let the flow's own cleanup run

    async def _send(self, call: Call) -> httpx.Response:
        request = build_request(self._http, call, self._timeout)
        response = await self._http.send(request, stream=True)
        if not call.stream or not response.is_success:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncDispatcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncTask:
    """A submitted prediction (see `Task`)."""

    def __init__(self, client: AsyncDispatcher, task_id: str) -> None:
        self._client = client
        self.task_id = task_id

    async def status(self, wait: float = 0.0) -> TaskInfo:
        return await self._client._run(flows.status(self.task_id, self._client.retry, wait))

    async def result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        return await self._client._run(flows.result(self.task_id, timeout, self._client.retry))

    async def cancel(self) -> TaskInfo:
        return await self._client._run(flows.cancel(self.task_id, self._client.retry))

    async def retry(self) -> AsyncTask:
        """This task run again (see `Dispatcher.retry_task`)."""
        return await self._client.retry_task(self.task_id)

    async def stream(
        self, *, last_event_id: str | None = None, raise_on_error: bool = False
    ) -> AsyncEventStream:
        return await self._client.stream(
            task_id=self.task_id, last_event_id=last_event_id, raise_on_error=raise_on_error
        )

    def __repr__(self) -> str:
        return f"AsyncTask({self.task_id!r})"


class AsyncEventStream:
    """A task's events (see `EventStream`): `async for`, or `async with` it to close early."""

    def __init__(
        self, client: AsyncDispatcher, session: StreamSession, raise_on_error: bool
    ) -> None:
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

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self

    async def __anext__(self) -> StreamEvent:
        return await anext(self._events)

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[StreamEvent, None]:
        """The connections in turn (an async generator cannot `yield from`: one loop)."""
        session = self._session
        while not session.finished:
            response = await self._open()
            if not isinstance(response, httpx.Response):
                await asyncio.sleep(response)
                continue
            delay: float | None = None
            try:
                async for chunk in response.aiter_bytes():
                    for event in session.feed(chunk):
                        if self._raise:
                            event.raise_for_error()
                        yield event
                    if session.finished:
                        break
                else:
                    delay = session.ended()
            except httpx.TransportError as error:
                delay = session.dropped(error)
            finally:
                await response.aclose()
            if delay is not None:
                await asyncio.sleep(delay)

    async def _open(self) -> httpx.Response | float:
        """An event stream to read, or the delay before connecting again."""
        session, http = self._session, self._client._http
        request = build_request(http, session.call(), self._client._timeout)
        try:
            response = await http.send(request, stream=True)
        except httpx.TransportError as error:
            return session.dropped(error)
        delay: float | None = 0.0
        try:
            if not response.is_success:
                await response.aread()
            delay = session.opened(response)
            return response if delay is None else delay
        except httpx.TransportError as error:
            return session.dropped(error)
        finally:
            if delay is not None:
                await response.aclose()


class AsyncBatch:
    """A submitted batch (see `Batch`)."""

    def __init__(
        self, client: AsyncDispatcher, batch_id: str, info: BatchInfo | None = None
    ) -> None:
        self._client = client
        self.batch_id = batch_id
        self.info = info

    async def status(self, wait: float = 0.0) -> BatchInfo:
        flow = flows.batch_status(self.batch_id, self._client.retry, wait)
        self.info = await self._client._run(flow)
        return self.info

    async def wait(self, timeout: float | None = None) -> BatchInfo:  # noqa: ASYNC109
        flow = flows.batch_wait(self.batch_id, timeout, self._client.retry)
        self.info = await self._client._run(flow)
        return self.info

    async def results(self) -> AsyncIterator[BatchResult]:
        response = await self._client._run(flows.batch_results(self.batch_id, self._client.retry))
        try:
            async for line in response.aiter_lines():
                item = flows.result_line(line)
                if item is not None:
                    yield item
        finally:
            await response.aclose()

    async def cancel(self) -> BatchInfo:
        self.info = await self._client._run(flows.batch_cancel(self.batch_id, self._client.retry))
        return self.info

    def __repr__(self) -> str:
        return f"AsyncBatch({self.batch_id!r})"
