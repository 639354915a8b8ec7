"""`AsyncDispatcher`: the asyncio client, the same flows as `Dispatcher` driven by httpx's
AsyncClient and asyncio.sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from . import _flows as flows
from ._models import BackendInfo, BatchInfo, BatchResult, TaskInfo
from ._retry import RetryPolicy
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

    def __repr__(self) -> str:
        return f"AsyncTask({self.task_id!r})"


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
