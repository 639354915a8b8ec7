"""The worker's Celery app: `celery -A worker.app worker -Q dispatch`."""

import logging

from shared import tracing
from shared.celery_app import create_celery_app
from shared.settings import get_settings
from worker import broker_fixes, broker_speed, refusals
from worker import task_metrics as metrics

# Module-level because Celery's CLI loads the app by name; settings come from the environment.
# Logging: Celery's `setup_logging` signal (shared/celery_app.py) routes it through shared/logs.py.
app = create_celery_app(get_settings())
# Traces when OTEL_EXPORTER_OTLP_ENDPOINT is set: a span per task, continuing the API's trace.
tracing.setup("model-dispatcher-worker")
app.conf.include = ["worker.consumer", "worker.heartbeat"]
# A Redis that refuses writes (OOM, read-only replica) must not crash the worker or lose messages.
refusals.install()
# Prometheus metrics on WORKER_METRICS_PORT, and this worker in the live-worker registry.
metrics.install()
# A broker connection loss must not end the worker either: acks of tasks that ran across the loss.
broker_fixes.install()
# One redis-py client per channel for kombu's per-message QoS calls, not one per call.
broker_speed.install()
# Per-task INFO lines ("received", "succeeded", httpx's "HTTP Request") cost ~15% of a worker's
# CPU per task (docs/BENCHMARKS.md); failures still log at WARNING and above, start-up at INFO.
logging.getLogger("httpx").setLevel(logging.WARNING)
if not get_settings().worker_log_tasks:
    for per_task_logger in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(per_task_logger).setLevel(logging.WARNING)
