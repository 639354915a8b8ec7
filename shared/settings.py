"""One settings class for the API and the workers, read from the environment (and `.env`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shared.backends import normalize_origin
from shared.redis_settings import RedisSettings

__all__ = ["Settings", "get_settings", "normalize_origin"]

MIB = 1024 * 1024
# A task's lease (its message's visibility timeout) is renewed every worker heartbeat
# (worker/heartbeat.py), so it only has to outlast a few missed heartbeats, not the longest task.
LEASE_HEARTBEATS = 3
DEFAULT_VISIBILITY_TIMEOUT = 60
# How long a task that ended failed, expired or canceled keeps its request and payload for a
# retry (RETRY_KEEP_SECONDS; shared/redis_state/record.py writes it into each record).
DEFAULT_RETRY_KEEP_SECONDS = 3600
# Longest a webhook event's retries may last: its record is kept 3 days (MIN_EVENT_TTL in
# shared/redis_state/keys.py).
WEBHOOK_MAX_SPAN = 2 * 86_400
# An operator key opens every tenant's tasks: too short a one could be guessed.
MIN_OPERATOR_KEY = 16


# API_WORKERS: its own type, as devstack (make run) validates it without the other settings.
ApiWorkers = Annotated[int, Field(ge=1, le=64)]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(RedisSettings):
    """Every knob of the service, each described once, here.

    `scripts/gen_docs.py` renders these descriptions into docs/configuration.md and the comments
    of .env.example, and CI fails when either is stale, so a description is the documentation.
    """

    # Inputs stay out of error messages: BACKENDS and REDIS_URL may hold secrets.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    dispatch_default_wait: float = Field(
        60.0,
        ge=0,
        description="How long a request with no wait preference blocks (s); at most "
        "`DISPATCH_MAX_WAIT`.",
    )
    dispatch_max_wait: float = Field(
        300.0, ge=0, description="Cap on `Prefer: wait=N` / `?wait=N` (s)."
    )
    dispatch_default_timeout: float = Field(
        600.0,
        gt=0,
        description="A task's deadline from submission when the request sets no `timeout` (s); "
        "at most `DISPATCH_MAX_TIMEOUT`.",
    )
    dispatch_max_timeout: float = Field(
        3600.0, gt=0, description="The largest `timeout` a request may set (s)."
    )

    result_ttl: int = Field(
        86_400, gt=0, description="How long task records are kept after they end (s)."
    )
    retry_keep_seconds: int = Field(
        DEFAULT_RETRY_KEEP_SECONDS,
        ge=0,
        le=7 * 86_400,
        description="How long the request and payload of a task that failed, expired or was "
        "canceled are kept after it ended, for `POST /tasks/{task_id}/retry` (s; at most as "
        "long as its record, `RESULT_TTL`); `0`: retry off (always a 409), nothing kept.",
    )
    retry_max_attempts: int = Field(
        10,
        ge=1,
        le=20,
        description="Attempts per task at its backend for a 503 or 429, a refused connection or "
        "a timeout (the defaults give a 9-18 s window, enough for a TorchServe restart; a "
        "Retry-After is waited at least).",
    )
    retry_backoff_initial: float = Field(
        0.2,
        gt=0,
        description="First retry delay (s), doubling, with jitter; at most `RETRY_BACKOFF_MAX`.",
    )
    retry_backoff_max: float = Field(3.0, gt=0, description="Longest retry delay (s).")

    max_queue_depth: int = Field(
        50_000,
        gt=0,
        description="Queued tasks per priority class (interactive, default, batch) beyond which "
        "submissions of that class get a 429.",
    )
    message_max_tasks: int = Field(
        16,
        ge=1,
        le=1_000,
        description="Most tasks one Celery message carries: concurrent submits to one API "
        "process are written together (group commit) and share a message, and a batch's items "
        "go this many to a message; each task keeps its own record, deadline, cancel and "
        "outcome. `1` turns grouping off.",
    )
    submit_linger_ms: float = Field(
        2.0,
        ge=0,
        le=50,
        description="While `SUBMIT_LINGER_WAITERS` or more sync callers wait in an API process, "
        "how long a submit that finds no write in flight waits for others to share its Redis "
        "call and message (ms); an idle API never waits. `0`: off.",
    )
    submit_linger_waiters: int = Field(
        8, ge=1, description="Sync callers waiting in one API process from which submits linger."
    )
    batch_max_requests: int = Field(
        10_000, gt=0, le=100_000, description="Most requests in one `POST /batches`."
    )
    max_batch_bytes: int = Field(
        64 * MIB,
        gt=0,
        description="Largest `POST /batches` body (JSON or JSONL), in bytes (64 MiB; each "
        "item's payload is still bounded by `MAX_BODY_BYTES`).",
    )
    max_body_bytes: int = Field(
        6_553_500,
        gt=0,
        description="Largest payload (bytes) as TorchServe will receive it (decoded for data "
        "URIs; the multipart encoding for file parts): TorchServe's own `max_request_size`.",
    )
    stream_max_entries: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Most output chunks one attempt of a streamed task may append to its stream; "
        "one more fails the task with a clear error (per attempt, like `STREAM_MAX_BYTES`).",
    )
    stream_max_bytes: int = Field(
        16 * MIB,
        ge=1,
        le=256 * MIB,
        description="Most bytes of output one attempt of a streamed task may append to its "
        "stream (16 MiB); one more fails the task with a clear error and the chunks already "
        "sent stay readable. Per attempt, so a task redelivered after its worker died can "
        "stream in full again: a stream holds at most `MAX_DELIVERIES` times this.",
    )
    dispatcher_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys; when set, every request but `/health` needs one (empty: no "
        "auth, for local use only).",
    )
    operator_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Operator keys for the console (`/console`) and `GET /status`: they see "
        "every tenant's tasks and the global figures. With any key set (these or "
        "`DISPATCHER_API_KEYS`) the console needs a key; a tenant key sees only its own tasks.",
    )

    broker_visibility_timeout: int = Field(
        0,
        ge=0,
        description="Seconds before a dead worker's tasks are redelivered; `0`: 60 s (or 12 "
        "heartbeats if longer). Live workers renew their leases every heartbeat, so at least 3 "
        "`WORKER_HEARTBEAT_INTERVAL`s.",
    )
    worker_log_tasks: bool = Field(
        False,
        description="Log a line per task received and finished (off by default: per-task lines "
        "cost the worker measurable CPU).",
    )
    log_format: Literal["console", "json"] = Field(
        "console",
        description="`json`: one JSON object a line, for log collectors (the Docker images set "
        "it); `console`: readable lines (`make run`).",
    )
    max_deliveries: int = Field(
        3,
        ge=1,
        description="A task delivered more often (its workers keep dying) is failed "
        "(`worker_lost`) instead of run again.",
    )
    worker_max_in_flight: int = Field(
        512,
        ge=1,
        le=100_000,
        description="Model calls one worker process runs at once, all on its one event loop "
        "(interactive tasks take a free slot first); it fetches no message while it holds this "
        "many tasks.",
    )
    worker_max_calls_per_backend: int = Field(
        8,
        ge=1,
        le=100_000,
        description="Calls one worker process has open to one model of one model server at "
        "once: enough to keep a TorchServe model's workers busy without filling its job queue; "
        "raise it for a server that batches hundreds of requests (docs/workers.md). While it is "
        "reached the worker fetches nothing, leaving the work in Redis for other workers.",
    )
    worker_heartbeat_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between worker heartbeats (what `/ready` counts as a live worker) "
        "and task lease renewals.",
    )
    reconcile_after_seconds: float = Field(
        60.0, ge=1, le=86_400, description="An accepted task whose message is in no queue and "
        "held by no live worker (kombu lost it) is enqueued again once accepted this long ago "
        "and found so by two rounds in a row (worker/reconciler.py).",
    )  # fmt: skip
    reconcile_period_seconds: float = Field(
        30.0, ge=0, le=3600, description="Seconds between reconcile rounds (one worker of the "
        "fleet runs each); `0`: off.",
    )  # fmt: skip
    worker_metrics_port: int = Field(
        9808,
        ge=0,
        le=65535,
        description="Each worker's Prometheus `/metrics` port (one per worker process or "
        "container); `0`: off.",
    )
    worker_metrics_host: str = Field(
        "0.0.0.0",
        description="Address the worker's metrics server binds; `127.0.0.1` keeps it local.",
    )
    metrics_require_key: bool = Field(
        False,
        description="Whether the API's `/metrics` needs an API key too (false: public, like "
        "`/health`).",
    )
    api_workers: ApiWorkers = Field(
        1,
        description="API processes (`uvicorn --workers`) started by `make run` and the API "
        "image (`python -m api`); above 1 they share a fresh `PROMETHEUS_MULTIPROC_DIR`.",
    )
    docs_public: bool = Field(
        True,
        description="Serve `/docs`, `/redoc` and `/openapi.json` without a key (the schema is "
        "no secret); false removes them.",
    )

    idempotency_ttl: int = Field(
        86_400, gt=0, description="How long an `Idempotency-Key` is remembered (s), per API key."
    )
    webhook_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins webhooks may go to (`https://host:port` exactly, "
        "`https://*.example.com`, `https://*`); empty: webhooks are refused. Wildcard matches "
        "must resolve to public addresses; exact ones are trusted. Needs `WEBHOOK_SECRET`.",
    )
    webhook_secret: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="`whsec_<base64>` signing secret; while rotating list the new one and the "
        "old one (each request carries both signatures).",
    )
    webhook_timeout: float = Field(
        15.0, gt=0, le=60, description="A delivery counts only as a 2xx within this (s)."
    )
    webhook_max_attempts: int = Field(
        10,
        ge=1,
        le=50,
        description="Attempts per webhook event before it is given up (`failed` in the "
        "delivery log).",
    )
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 10800.0, 21600.0],
        description="Delays (s) before the 2nd, 3rd, ... attempt, each in (0, 86400], jittered "
        "±20%; the last one repeats. With `WEBHOOK_MAX_ATTEMPTS` it spans at most 2 days.",
    )
    webhook_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="The webhook consumer's Prometheus `/metrics` port "
        "(`dispatcher_webhook_deliveries_total`); `0`: off.",
    )

    @field_validator(
        "dispatcher_api_keys",
        "operator_api_keys",
        "webhook_allowed_origins",
        "webhook_secret",
        "webhook_retry_schedule",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("operator_api_keys")
    @classmethod
    def _valid_operator_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(key.get_secret_value()) < MIN_OPERATOR_KEY for key in value):
            raise ValueError(f"OPERATOR_API_KEYS: each key needs {MIN_OPERATOR_KEY}+ characters")
        return value

    @field_validator("webhook_allowed_origins")
    @classmethod
    def _valid_webhook_origins(cls, value: list[str]) -> list[str]:
        from shared.webhooks import OriginRule  # here: shared.webhooks imports this module

        return [str(OriginRule.parse(item)) for item in value]

    @field_validator("webhook_secret")
    @classmethod
    def _valid_webhook_secrets(cls, value: list[SecretStr]) -> list[SecretStr]:
        from shared.webhooks import secret_bytes

        for secret in value:
            secret_bytes(secret.get_secret_value())  # raises ValueError naming the format
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _valid_schedule(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < delay <= 86_400 for delay in value):
            raise ValueError("WEBHOOK_RETRY_SCHEDULE: one or more delays, each 0 < s <= 86400")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.dispatch_default_wait > self.dispatch_max_wait:
            raise ValueError("DISPATCH_DEFAULT_WAIT must not exceed DISPATCH_MAX_WAIT")
        if self.dispatch_default_timeout > self.dispatch_max_timeout:
            raise ValueError("DISPATCH_DEFAULT_TIMEOUT must not exceed DISPATCH_MAX_TIMEOUT")
        if self.retry_backoff_initial > self.retry_backoff_max:
            raise ValueError("RETRY_BACKOFF_INITIAL must not exceed RETRY_BACKOFF_MAX")
        if (
            self.broker_visibility_timeout
            and self.broker_visibility_timeout < LEASE_HEARTBEATS * self.worker_heartbeat_interval
        ):
            raise ValueError(
                f"BROKER_VISIBILITY_TIMEOUT must be at least {LEASE_HEARTBEATS} x "
                "WORKER_HEARTBEAT_INTERVAL: workers renew the lease of every task they hold once "
                "a heartbeat, and a lease that runs out delivers a running task a second time"
            )
        last = len(self.webhook_retry_schedule) - 1
        span = sum(
            self.webhook_retry_schedule[min(i, last)] for i in range(self.webhook_max_attempts - 1)
        )
        if span > WEBHOOK_MAX_SPAN:
            raise ValueError(
                f"WEBHOOK_RETRY_SCHEDULE x WEBHOOK_MAX_ATTEMPTS spans {span:g} s; at most "
                f"{WEBHOOK_MAX_SPAN} s (events are kept 3 days)"
            )
        tenants = {key.get_secret_value() for key in self.dispatcher_api_keys}
        if any(key.get_secret_value() in tenants for key in self.operator_api_keys):
            raise ValueError(
                "a key is in both OPERATOR_API_KEYS and DISPATCHER_API_KEYS: give operators "
                "keys of their own (an operator sees every tenant's tasks)"
            )
        if self.webhook_allowed_origins and not self.webhook_secret:
            raise ValueError(
                "WEBHOOK_ALLOWED_ORIGINS needs WEBHOOK_SECRET (whsec_<base64>): webhooks are "
                "always signed"
            )
        return self

    @property
    def task_time_limit(self) -> float:
        """Longest a task can run: its deadline is capped, and one last attempt may overrun it."""
        return self.dispatch_max_timeout + self.torchserve_connect_timeout + 5

    @property
    def visibility_timeout(self) -> int:
        """How long a dead worker's tasks wait for redelivery (live workers renew their leases)."""
        if self.broker_visibility_timeout:
            return self.broker_visibility_timeout
        return int(max(DEFAULT_VISIBILITY_TIMEOUT, 12 * self.worker_heartbeat_interval))


@lru_cache
def get_settings() -> Settings:
    """This process's settings; tests build `Settings(...)` or set env vars for subprocesses."""
    return Settings()
