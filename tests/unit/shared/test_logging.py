"""shared/logs.py: one format for every logger of a process, JSON or console.

Each case runs in a fresh interpreter (logging is process-wide): uvicorn's own dictConfig first,
as uvicorn does, then the dispatcher's set-up, then lines from the stdlib, uvicorn, Celery,
structlog and the warnings module. The e2e side (a real API and worker writing JSON lines with
request ids) is tests/test_request_id_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from tests.support.paths import REPO

SECRET_LOCAL = "s3cret-local-value"

EMIT = f"""
import logging, warnings
import structlog
from shared.logs import bind_task, request_context, task_context

def fail(password):
    raise ValueError("bad input")

with request_context("req-1"):
    bind_task("task-1", "echo")
    logging.getLogger("api.something").info("submitted %s", "once")
logging.getLogger("uvicorn.error").info("Application startup complete.")
access = ("1.2.3.4:5", "GET", "/x", "1.1", 200)
logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', *access)
logging.getLogger("celery.worker.consumer").warning("celery line")
with task_context("task-2", "linear", "req-2"):
    structlog.get_logger("worker.consumer").info("keyed", attempt=2)
    try:
        fail("{SECRET_LOCAL}")
    except ValueError:
        logging.getLogger("worker.consumer").exception("crashed")
warnings.warn("a warning", UserWarning, stacklevel=1)
logging.getLogger("after").info("no context here")
"""


def run(setup: str) -> list[str]:
    code = textwrap.dedent(setup) + EMIT
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # logs go to stderr
    return result.stderr.splitlines()


def by_event(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(line["event"]).splitlines()[0]: line for line in lines}


def uvicorn_first(then: str) -> str:
    # What uvicorn does before it builds the app: its own handlers on its own loggers.
    return f"""
    import logging.config
    from uvicorn.config import LOGGING_CONFIG
    logging.config.dictConfig(LOGGING_CONFIG)
    {then}
    """


def test_json_lines_from_every_logger_with_the_bound_context() -> None:
    raw = run(uvicorn_first("from shared.logs import configure_logging; configure_logging('json')"))
    lines = [json.loads(line) for line in raw]  # every line is one JSON object
    events = by_event(lines)
    assert all({"timestamp", "level", "logger", "event"} <= set(line) for line in lines)
    assert events["submitted once"] | {"timestamp": None} == {
        "event": "submitted once",
        "request_id": "req-1",
        "task_id": "task-1",
        "model": "echo",
        "level": "info",
        "logger": "api.something",
        "timestamp": None,
    }
    assert events["Application startup complete."]["logger"] == "uvicorn.error"
    assert events['1.2.3.4:5 - "GET /x HTTP/1.1" 200']["logger"] == "uvicorn.access"
    assert events["celery line"]["level"] == "warning"
    keyed = events["keyed"]
    assert (keyed["attempt"], keyed["task_id"], keyed["model"], keyed["request_id"]) == (
        2,
        "task-2",
        "linear",
        "req-2",
    )
    crashed = events["crashed"]
    assert crashed["level"] == "error"
    assert "ValueError: bad input" in crashed["exception"]
    assert SECRET_LOCAL not in "\n".join(raw)  # tracebacks never show locals
    assert events[next(e for e in events if "a warning" in e)]["logger"] == "py.warnings"
    # Context ends with the request and the task.
    assert set(events["no context here"]) == {"event", "level", "logger", "timestamp"}
    assert events["Application startup complete."].get("task_id") is None


def test_console_lines_are_readable_and_plain() -> None:
    raw = run(uvicorn_first("from shared.logs import configure_logging; configure_logging()"))
    text = "\n".join(raw)
    assert "\x1b[" not in text  # no colors when stderr is not a terminal
    submitted = next(line for line in raw if "submitted once" in line)
    assert "[info     ] submitted once" in submitted
    assert "[api.something]" in submitted
    assert "request_id=req-1" in submitted
    assert "task_id=task-1" in submitted
    assert "model=echo" in submitted
    assert any("[uvicorn.error]" in line and "startup complete" in line for line in raw)
    assert any("[uvicorn.access]" in line and "GET /x" in line for line in raw)
    assert "Traceback (most recent call last):" in text
    assert "ValueError: bad input" in text
    assert SECRET_LOCAL not in text
    for line in raw:
        try:
            json.loads(line)
        except ValueError:
            continue
        raise AssertionError(f"a JSON line in console mode: {line}")


def test_celery_workers_log_through_it() -> None:
    # What `celery worker` runs at start: the app's logging set-up, which our `setup_logging`
    # receiver replaces (no Celery handlers, no stdout redirection).
    raw = run(
        """
        import os
        os.environ["LOG_FORMAT"] = "json"
        from shared.celery_app import create_celery_app
        from shared.settings import Settings
        app = create_celery_app(Settings(_env_file=None))
        app.log.setup(loglevel="INFO", redirect_stdouts=True)
        import logging, sys
        assert not logging.getLogger("celery").handlers
        assert type(sys.stdout).__name__ != "LoggingProxy"  # prints are not redirected
        """
    )
    lines = [json.loads(line) for line in raw]
    assert by_event(lines)["celery line"]["logger"] == "celery.worker.consumer"


def test_the_api_applies_log_format() -> None:
    raw = run(
        """
        from api.main import create_app
        from shared.settings import Settings
        create_app(Settings(_env_file=None, log_format="json"))
        """
    )
    assert all(json.loads(line) for line in raw)


def test_uvicorn_no_access_log_stays_off() -> None:
    # `uvicorn --no-access-log` (devstack, make run, the benchmark): uvicorn sets its loggers up
    # without the access handler; the dispatcher's set-up must not route the line back in.
    raw = run(
        """
        from uvicorn.config import Config
        Config("api.main:create_app", access_log=False).configure_logging()
        from shared.logs import configure_logging
        configure_logging("json")
        import logging
        assert not logging.getLogger("uvicorn.access").hasHandlers()  # uvicorn skips the line
        """
    )
    loggers = {json.loads(line)["logger"] for line in raw}
    assert "uvicorn.access" not in loggers
    assert {"uvicorn.error", "api.something", "worker.consumer"} <= loggers
