"""The one caller of every backend: attempts, retries, deadlines, tracing, metrics.

A task's call names its backend (`call.backend`); the worker looks it up in its own settings
(`settings.backend_map`), so a message can neither point a worker at a server the operator did
not configure nor carry a backend's token. The backend's protocol builds the request and reads
the answer (base.BackendClient); everything else is here, the same for every protocol:

- an attempt's read timeout is the backend's, cut to what is left of the task's deadline (a
  timeout cut short is DeadlineExceeded, not the backend's fault);
- a retryable error (refused, timed out, 503, 429) is tried again with jittered exponential
  backoff, up to RETRY_MAX_ATTEMPTS attempts; a `Retry-After` it came with is waited at least,
  and no retry starts that could not finish before the deadline;
- every attempt is a CLIENT span whose `traceparent` is sent, carries the task's `X-Request-ID`,
  and is timed in the backend request histogram (task_metrics.py);
- a streamed call (`call.stream`) reads a 2xx body as it arrives (stream_call.py), each output
  sent to the sink given, and is retried only while it has sent none.

Redirects are never followed (a redirect could point anywhere: no SSRF through a model server),
and no cookie carries over from one task's call to another's. One Caller per worker process,
used from its one event loop; every backend shares its Pool (keep-alive connections per origin).
It may be built before the loop runs: nothing binds to a loop until a call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from shared import tracing
from shared.backends import Backend, Protocol
from shared.errors import BackendNotConfigured, DeadlineExceeded, DispatchError
from shared.logs import current_request_id
from shared.models import PredictionCall
from shared.settings import Settings
from worker import task_metrics as metrics
from worker.backends.base import Answer, BackendClient, Request
from worker.backends.oip import OpenInference
from worker.backends.openai import OpenAI
from worker.backends.stream_call import OutputSink, StreamedCall
from worker.backends.torchserve import TorchServe
from worker.http_client import ConnectError, HttpError, Pool, ReadTimeout, Transport

log = logging.getLogger(__name__)

PROTOCOLS: Mapping[Protocol, type[BackendClient]] = {
    Protocol.torchserve: TorchServe,
    Protocol.oip: OpenInference,
    Protocol.openai: OpenAI,
}
# A retry never starts with less than this left before the deadline: it could not finish anyway.
MIN_ATTEMPT_SECONDS = 0.05
# Jitter keeps many workers that failed together from retrying together.
JITTER = 0.5
# What every attempt sends besides its body and credentials. Identity: this client does not
# decompress, and model servers compress nothing they are not asked to.
DEFAULT_HEADERS = (
    ("User-Agent", "model-dispatcher"),
    ("Accept", "*/*"),
    ("Accept-Encoding", "identity"),
)


class Caller:
    """Runs a task's call against its backend; `predict_answer` is the whole of it."""

    def __init__(
        self,
        settings: Settings,
        pool: Transport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        max_per_origin: int = 256,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        if pool is None:
            # The defaults of calls that pass none; every call passes its backend's timeouts.
            pool = Pool(
                connect_timeout=settings.torchserve_connect_timeout,
                read_timeout=settings.torchserve_read_timeout,
                max_per_origin=max_per_origin,
            )
        self._pool = pool
        self.clients: dict[str, BackendClient] = {
            name: PROTOCOLS[backend.protocol](backend, settings)
            for name, backend in settings.backend_map.items()
        }

    async def aclose(self) -> None:
        """Close the pool's connections, a given pool's too (the caller is its only user)."""
        await self._pool.aclose()

    def backend(self, call: PredictionCall) -> Backend | None:
        """The call's backend as this worker configures it; None when it has none such."""
        client = self.clients.get(call.backend)
        return None if client is None else client.backend

    def client(self, call: PredictionCall) -> BackendClient:
        """The protocol client of the call's backend, or BackendNotConfigured."""
        client = self.clients.get(call.backend)
        if client is None:
            raise BackendNotConfigured(
                f"backend {call.backend[:64]!r} is not configured on this worker (its BACKENDS "
                f"differs from the API's); configured here: {', '.join(sorted(self.clients))}"
            )
        if call.operation not in client.backend.operations:
            raise BackendNotConfigured(
                f"backend {call.backend!r} speaks {client.backend.protocol.value} on this worker, "
                f"which has no operation {call.operation[:64]!r} (its BACKENDS differs from the "
                "API's)"
            )
        return client

    async def predict(self, call: PredictionCall) -> Any:
        """The parsed prediction of a JSON call, or a DispatchError after bounded retries."""
        return (await self.predict_answer(call)).value

    async def predict_answer(
        self, call: PredictionCall, payload: bytes | None = None, sink: OutputSink | None = None
    ) -> Answer:
        """The answer, or a DispatchError after bounded retries.

        `payload`: the bytes of `call.payload` (read from the message or the claim check);
        without it the call's JSON `body` is sent. `sink`: where a streamed call's outputs go
        (none: they are dropped, the answer is the same).
        """
        client = self.client(call)
        request = client.request(call, payload)
        stream = StreamedCall(client, call, sink) if call.stream else None
        attempt = 1
        while True:
            try:
                with metrics.backend_request(client.backend, call.model_name):
                    return await self._attempt(client, call, request, stream)
            except DispatchError as error:
                delay = self._delay(attempt, error)
                if not error.retryable or attempt >= self._settings.retry_max_attempts:
                    raise
                if stream is not None and stream.sent:  # see stream_call.py: never sent twice
                    raise
                if time.time() + delay + MIN_ATTEMPT_SECONDS >= call.deadline:
                    raise self._past_deadline(request, error) from error
                log.info("retrying %r in %.2fs after %s", call, delay, error.code)
                metrics.count_retry(client.backend, call.model_name, error.code)
                await self._sleep(delay)
                attempt += 1

    def _delay(self, attempt: int, error: DispatchError) -> float:
        """The backoff before attempt `attempt + 1`, at least what Retry-After asked for."""
        ceiling = min(
            self._settings.retry_backoff_max,
            self._settings.retry_backoff_initial * 2.0 ** (attempt - 1),
        )
        jitter: float = 1 - JITTER + JITTER * random.random()  # noqa: S311 - not crypto
        asked: float | None = getattr(error, "retry_after", None)
        return max(ceiling * jitter, asked or 0.0)

    @staticmethod
    def _past_deadline(request: Request, error: DispatchError) -> DeadlineExceeded:
        asked: float | None = getattr(error, "retry_after", None)
        if asked:
            return DeadlineExceeded(
                f"{error.msg}; it asked to be retried in {asked:g}s (Retry-After), past the "
                "task's deadline"
            )
        return DeadlineExceeded(f"deadline passed while retrying {request.origin}: {error.msg}")

    async def _attempt(
        self, client: BackendClient, call: PredictionCall, request: Request,
        stream: StreamedCall | None = None,
    ) -> Answer:  # fmt: skip
        where = client.where(request.origin)
        remaining = call.deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded(f"the task's deadline passed before {request.origin} answered")
        read_timeout = min(client.backend.read_timeout, remaining)
        headers = [*DEFAULT_HEADERS, *request.headers]
        request_id = current_request_id()
        if request_id is not None:  # a TorchServe handler reads it: context.get_request_header
            headers.append(("X-Request-ID", request_id))
        attributes = {"dispatcher.backend": client.backend.name}
        with tracing.client_span(request.method, request.url, attributes) as span:
            headers += span.headers
            try:
                reply = await self._pool.request(
                    request.method, request.url, headers, request.body,
                    read_timeout=read_timeout, connect_timeout=client.backend.connect_timeout,
                )  # fmt: skip
                if stream is not None and client.succeeded(reply.status):
                    span.answered(reply.status)
                    return await stream.read(reply, where, read_timeout)  # its own errors
                try:
                    content = await reply.read()
                finally:
                    await reply.aclose()
            except ConnectError as error:
                raise client.unavailable(f"cannot connect to {where}") from error
            except ReadTimeout as error:
                if read_timeout < client.backend.read_timeout:
                    raise DeadlineExceeded(
                        f"{where} was still working when the deadline passed"
                    ) from error
                raise client.timeout(f"{where} did not answer within {read_timeout:g}s") from error
            except (HttpError, ValueError) as error:  # ValueError: a header with a line break
                raise client.unavailable(
                    f"connection to {where} failed ({type(error).__name__})"
                ) from error
            span.answered(reply.status)
        if client.succeeded(reply.status):
            return client.answer(content, reply)
        raise client.error(reply.status, content, reply, call)
