"""One log format for the API, the workers, uvicorn and Celery: structlog over the stdlib.

Every process calls `configure_logging` once (the API in `create_app`, workers from Celery's
`setup_logging` signal). It puts one handler on the root logger whose
`structlog.stdlib.ProcessorFormatter` renders every record, so `logging.getLogger(...)` calls,
uvicorn's loggers and Celery's all come out the same way: JSON lines with `LOG_FORMAT=json`,
readable console lines otherwise. Fields: `timestamp` (ISO 8601, UTC), `level`, `logger`,
`event`, then what is bound to the context (`request_id`, `task_id`, `model`) and `exception`.

Context is bound with structlog's contextvars: the API binds `request_id` per request
(api/request_id.py) and `task_id`/`model` once a task exists; a worker binds all three around
each task (`task_context`). What must never be bound or logged: secrets, payloads, predictions.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars, unbind_contextvars
from structlog.typing import Processor

LogFormat = Literal["console", "json"]

# The current request's id, for what leaves the process with it (the Celery message, the
# TorchServe call); log lines get it from structlog's contextvars like the rest of the context.
_request_id: ContextVar[str | None] = ContextVar("dispatcher_request_id", default=None)

# Loggers that come with their own handlers (uvicorn's dictConfig) or are otherwise kept from the
# root: they are reset to propagate to it, so there is one handler and one format.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task")

_configured: tuple[LogFormat, int] | None = None
_OWN = "_dispatcher_handler"


def _renderer(log_format: LogFormat) -> list[Processor]:
    if log_format == "json":
        return [
            structlog.processors.format_exc_info,  # the traceback as one `exception` string
            structlog.processors.JSONRenderer(),
        ]
    # Colors only on a terminal: log files and the tests' greps get plain text. Plain tracebacks:
    # rich's (the default when rich is installed) print every frame's locals, secrets included.
    return [
        structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    ]


def configure_logging(log_format: LogFormat = "console", level: int | str = logging.INFO) -> None:
    """Route every logger of this process through one structlog formatter on stderr.

    Idempotent: calling it again with the same arguments changes nothing (uvicorn's workers and
    Celery's signal may both get here).
    """
    global _configured
    level = logging.getLevelName(level) if isinstance(level, str) else level
    if _configured == (log_format, level):
        return
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(log_format),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Only our own earlier handler goes: others on the root (pytest's capture) stay.
    for old in root.handlers[:]:
        if getattr(old, _OWN, False):
            root.removeHandler(old)
    setattr(handler, _OWN, True)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings become log lines (`py.warnings`) like the rest
    for name in _FOREIGN_LOGGERS:
        logger = logging.getLogger(name)
        if _switched_off(logger):
            continue
        logger.handlers.clear()
        logger.propagate = True
    _configured = (log_format, level)


def _switched_off(logger: logging.Logger) -> bool:
    """uvicorn's `--no-access-log` leaves `uvicorn.access` with no handler and no propagation
    (and then skips formatting the line at all): routing it to the root would turn the access
    log back on, a formatted line per request that the operator asked not to pay for."""
    return logger.name == "uvicorn.access" and not logger.propagate and not logger.handlers


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger (key-value events); plain `logging.getLogger` works just as well."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def current_request_id() -> str | None:
    """The id of the request (API) or task delivery (worker) this code runs for, if any."""
    return _request_id.get()


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """One API request: its log lines carry `request_id`, its task messages the id itself."""
    token = _request_id.set(request_id)
    bound = bind_contextvars(request_id=request_id)
    try:
        yield
    finally:
        reset_contextvars(**bound)
        unbind_contextvars("task_id", "model")  # bound by `bind_task` during the request
        _request_id.reset(token)


def bind_task(task_id: str, model: str) -> None:
    """Bind a task to the rest of this request's log lines (the API, once the task exists)."""
    bind_contextvars(task_id=task_id, model=model)


@contextmanager
def task_context(
    task_id: str, model: str, request_id: str | None, backend: str | None = None
) -> Iterator[None]:
    """A worker's task: its log lines carry task_id, model, backend and request_id, and its
    backend call sends the request id; all unbound afterwards (one loop runs many tasks)."""
    context: dict[str, Any] = {"task_id": task_id, "model": model}
    if backend is not None:
        context["backend"] = backend
    if request_id is not None:
        context["request_id"] = request_id
    token = _request_id.set(request_id)
    bound = bind_contextvars(**context)
    try:
        yield
    finally:
        reset_contextvars(**bound)
        _request_id.reset(token)
