"""The worker's Celery app: `celery -A worker.app worker -Q dispatch`."""

from shared import tracing
from shared.celery_app import create_celery_app, quiet_per_task_logs
from shared.settings import get_settings
from worker import kombu_patches
from worker import task_metrics as metrics

# Module-level because Celery's CLI loads the app by name; settings come from the environment.
# Logging: Celery's `setup_logging` signal (shared/celery_app.py) routes it through shared/logs.py.
app = create_celery_app(get_settings())
# Traces when OTEL_EXPORTER_OTLP_ENDPOINT is set: a span per task, continuing the API's trace.
tracing.setup("model-dispatcher-worker")
# The reconciler (worker/reconciler.py) enqueues again what kombu lost, from one worker a round.
app.conf.include = ["worker.consumer", "worker.heartbeat", "worker.reconciler"]
# A Redis that refuses writes (OOM, read-only replica) or a broker connection loss must not crash
# the worker or lose messages; one redis-py client per channel (worker/kombu_patches/).
kombu_patches.install()
# Prometheus metrics on WORKER_METRICS_PORT, and this worker in the live-worker registry.
metrics.install()
quiet_per_task_logs(get_settings())
