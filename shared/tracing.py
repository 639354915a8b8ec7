"""OpenTelemetry traces, on when OTEL_EXPORTER_OTLP_ENDPOINT is set and the `otel` extra is
installed (`pip install 'model-dispatcher[otel]'`).

One trace per request: the API's FastAPI span (with its Redis calls), then, across the queue,
the worker's `dispatch.predict` span and its TorchServe HTTP call (`client_span`: the worker's
own HTTP client has no instrumentation package). Celery's `before_task_publish`
never fires for the messages the API builds itself, so `inject` writes the W3C `traceparent`
into their headers (shared/celery_app.py) and `task_span` continues it in the worker.

Only the dispatcher's own clients are instrumented (its Redis clients, its HTTP clients, its
FastAPI app), never Celery's broker connections: a span per broker poll would drown the traces.

Off (the default), nothing of OpenTelemetry is imported and every hook returns after one check of
a module global: no cost on the hot path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
# The W3C trace context headers `inject` writes and `task_span` reads.
CARRIER_KEYS = ("traceparent", "tracestate")


@dataclass
class _Tracing:
    provider: TracerProvider
    tracer: Tracer
    undo: list[Callable[[], None]] = field(default_factory=list)


_state: _Tracing | None = None


def enabled() -> bool:
    return _state is not None


def setup(service_name: str, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on for this process, if configured; whether it is on.

    Spans go to the OTLP/HTTP endpoint of OTEL_EXPORTER_OTLP_ENDPOINT (the exporter reads the
    standard OTEL_EXPORTER_OTLP_* variables: headers, timeout...), in batches, or to `exporter`
    one by one (tests: the SDK's InMemorySpanExporter). OTEL_SERVICE_NAME overrides the name.
    """
    global _state
    if _state is not None:
        return True
    if exporter is None and not os.environ.get(ENDPOINT_VARIABLE):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning(
            "%s is set but OpenTelemetry is not installed: pip install 'model-dispatcher[otel]'; "
            "tracing stays off",
            ENDPOINT_VARIABLE,
        )
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Batches leave from a background thread (re-created in forked pool children).
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        # The process's provider, so its shutdown at exit flushes what is left.
        trace.set_tracer_provider(provider)
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _state = _Tracing(provider, provider.get_tracer("model-dispatcher"))
    log.info("tracing on: service %s", resource.attributes.get("service.name"))
    return True


def shutdown() -> None:
    """Flush and end tracing, undoing the instrumentation (tests turn it on and off)."""
    global _state
    state, _state = _state, None
    if state is None:
        return
    for undo in reversed(state.undo):
        undo()
    state.provider.shutdown()


def instrument_app(app: Any) -> None:
    """Server spans for every request of a FastAPI app."""
    if _state is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=_state.provider, exclude_spans=["receive", "send"]
    )
    _state.undo.append(lambda: FastAPIInstrumentor.uninstrument_app(app))


def instrument_redis(client: Any) -> None:
    """Client spans for one of the dispatcher's own Redis clients (sync or asyncio)."""
    if _state is None:
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor.instrument_client(client, tracer_provider=_state.provider)
    _state.undo.append(lambda: RedisInstrumentor.uninstrument_client(client))


def instrument_httpx(client: Any) -> None:
    """Client spans for one httpx client (sync or async): the TorchServe calls."""
    if _state is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=_state.provider)
    _state.undo.append(lambda: HTTPXClientInstrumentor.uninstrument_client(client))


class ClientSpan:
    """One outgoing HTTP call's span, as its caller sees it: the trace headers to send, and where
    to report the answer's status. Off, it is a shared instance with no headers that records
    nothing."""

    __slots__ = ("_span", "headers")

    def __init__(self, headers: tuple[tuple[str, str], ...] = (), span: Span | None = None) -> None:
        self.headers = headers
        self._span = span

    def answered(self, status: int) -> None:
        """The answer's status; 4xx and 5xx mark the span an error, as HTTP instrumentations do."""
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("http.response.status_code", status)
        if status >= 400:
            self._span.set_attribute("error.type", str(status))
            self._span.set_status(Status(StatusCode.ERROR))


_NO_SPAN = nullcontext(ClientSpan())


def client_span(
    method: str, url: str, extra: Mapping[str, str] | None = None
) -> AbstractContextManager[ClientSpan]:
    """A CLIENT span around one HTTP call, a child of the current span, named like the httpx
    instrumentation's (the method), whose `traceparent` the caller sends: the model server's
    spans, and its logs, join the task's trace. `extra`: more attributes (the backend's name)."""
    if _state is None:
        return _NO_SPAN
    return _client_span(_state.tracer, method, url, extra or {})


@contextmanager
def _client_span(
    tracer: Tracer, method: str, url: str, extra: Mapping[str, str]
) -> Iterator[ClientSpan]:
    from opentelemetry.propagate import inject as otel_inject
    from opentelemetry.trace import SpanKind

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        # Neither credentials nor the query string: both may hold secrets.
        "url.full": f"{parts.scheme}://{netloc}{parts.path}",
        "server.address": host,
    }
    if parts.port is not None:
        attributes["server.port"] = parts.port
    attributes.update(extra)
    with tracer.start_as_current_span(method, kind=SpanKind.CLIENT, attributes=attributes) as span:
        carrier: dict[str, str] = {}
        otel_inject(carrier)
        yield ClientSpan(tuple(carrier.items()), span)


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context (W3C `traceparent`) into a message's headers."""
    if _state is None:
        return
    from opentelemetry.propagate import inject as otel_inject

    otel_inject(headers)


def task_span(
    name: str, headers: Any, attributes: dict[str, str]
) -> AbstractContextManager[object]:
    """The span of one task, a child of the trace context in its message `headers` (anything
    with `.get(key)`: a Celery task's `request`, a dict)."""
    if _state is None:
        return nullcontext()
    return _task_span(_state.tracer, name, headers, attributes)


@contextmanager
def _task_span(
    tracer: Tracer, name: str, headers: Any, attributes: dict[str, str]
) -> Iterator[object]:
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    carrier = {key: value for key in CARRIER_KEYS if isinstance(value := headers.get(key), str)}
    parent = extract(carrier)
    with tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span
