"""The FastAPI application: `uvicorn api.main:create_app --factory`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from api.backend_probe import BackendProbe
from api.batch_store import BatchStore
from api.console import routes as console
from api.docs import install_docs
from api.errors import install_error_handlers
from api.limits import BodySizeLimit
from api.metrics import ApiMetrics, install_metrics, release_process_metrics
from api.openapi import install_openapi
from api.request_id import RequestId
from api.routes import backends, batches, deliveries, dispatch, health, status, streams, tasks
from api.store import ApiStore
from api.waiting import ResultWaiter
from shared import heap, tracing
from shared.logs import configure_logging
from shared.primary_watch import PrimaryWatch
from shared.redis_connect import async_client
from shared.redis_state.stream_reader import DEFAULT_BLOCK_MS, SOCKET_MARGIN, StreamHub
from shared.replica_wait import ReplicaWait
from shared.settings import Settings, get_settings

# Requests share this many Redis connections and wait for a free one rather than open more:
# thousands of waiting clients must not mean thousands of Redis connections.
REDIS_POOL_SIZE = 128
# FastAPI's own OpenTelemetry middleware (FastAPI >= 0.16x) asks OpenTelemetry on every request
# whether a provider is configured: an `os.environ` lookup that fails, a large share of the
# API's CPU per submit in a profile. Traces here are shared/tracing.py's (the FastAPI
# instrumentation, which turns the native one off anyway when it is installed), so the native
# one is off for good.
NATIVE_TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
# How long a request may queue for a free connection in a burst. A Redis that is down fails
# fast (refused), so this does not delay the 503 of an outage; a busy pool is not an outage.
POOL_WAIT_SECONDS = 5.0


def redis_client(settings: Settings) -> aioredis.Redis:
    """Fails within ~2 s when Redis is down, so callers get a 503 instead of a hang. Every
    request, and the result listener's pub/sub connection (api/waiting.py), share its pool."""
    return async_client(
        settings,
        max_connections=REDIS_POOL_SIZE,
        pool_timeout=POOL_WAIT_SECONDS,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=min(1.0, settings.redis_socket_timeout),
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
    )


def hub_reader(settings: Settings) -> aioredis.Redis:
    """The stream hub's own connection: one blocking XREAD at a time, so it is never shared
    with requests; its socket outlasts the block (a block is not an outage), and a dead Redis
    still fails the connect within a second (the hub retries by itself)."""
    return async_client(
        settings,
        socket_timeout=DEFAULT_BLOCK_MS / 1000 + SOCKET_MARGIN + settings.redis_socket_timeout,
        socket_connect_timeout=min(1.0, settings.redis_socket_timeout),
        client_name="dispatcher-stream-hub",
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Here, not in uvicorn's command line: every way of starting the app (Docker, devstack,
    # `uvicorn --workers N`) gets the same logs; uvicorn's loggers are routed through it too.
    configure_logging(settings.log_format)
    tracing.setup("model-dispatcher-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis_client(settings)
        metrics = ApiMetrics()
        waiter = ResultWaiter(client, observer=metrics)
        app.state.settings = settings
        app.state.store = ApiStore(
            client,
            settings,
            observer=metrics,
            # Busy enough for submits to linger and share a write (api/group_commit.py).
            busy=lambda: waiter.waiting >= settings.submit_linger_waiters,
        )
        app.state.batches = BatchStore(client, settings)
        app.state.waiter = waiter
        app.state.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        app.state.probe = BackendProbe(app.state.http, settings.backend_map)
        tracing.instrument_redis(client)
        tracing.instrument_httpx(app.state.http)
        reader = hub_reader(settings)
        # Its wake-ups go through the pool: one short command now and then.
        app.state.hub = StreamHub(reader, client, block_ms=DEFAULT_BLOCK_MS)
        # Moves the listener's subscription and the hub's XREAD after a failover.
        watch = PrimaryWatch([client, reader])
        # REDIS_WAIT_AOF on a server without WAITAOF: refuse to start, naming the version. With
        # Redis down the first count of the replicas checks it instead (submits 503 till then).
        with contextlib.suppress(RedisError, OSError):
            await ReplicaWait.of(client, settings).start()
        await waiter.start()
        app.state.hub.start()
        watch.start()
        heap.freeze_startup_heap()  # everything start-up built lives until exit
        try:
            yield
        finally:
            await watch.stop()
            await app.state.hub.close()  # ends every open stream response (clients reconnect)
            await reader.aclose()
            await waiter.stop()
            await app.state.http.aclose()
            await client.aclose()
            release_process_metrics()

    app = FastAPI(
        title="model-dispatcher",
        summary="Dependable model inference (TorchServe, Open Inference Protocol, OpenAI-"
        "compatible servers): sync or async, queued on Celery over Redis.",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=NATIVE_TELEMETRY_OFF,
        # FastAPI's documentation pages load their scripts from a CDN: api/docs.py serves them.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        path_limits={"/batches": (settings.max_batch_bytes, "MAX_BATCH_BYTES")},
    )
    app.add_middleware(RequestId)  # outside the others: their answers carry the id too
    app.include_router(dispatch.router)
    app.include_router(tasks.router)
    app.include_router(streams.router)
    app.include_router(batches.router)
    app.include_router(deliveries.router)
    app.include_router(health.router)
    app.include_router(backends.router)
    app.include_router(status.router)
    app.include_router(console.router)
    install_openapi(app, settings)
    install_docs(app, settings)
    install_metrics(app, settings)  # last: its middleware wraps the others
    tracing.instrument_app(app)
    return app
