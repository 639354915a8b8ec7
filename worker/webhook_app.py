"""The webhook consumer's Celery app: `celery -A worker.webhook_app worker -Q webhooks -P threads`.

Its own process and queue, so a slow, dead or hostile receiver holds only this consumer's threads,
never a prediction worker (nor a cancel, which the API does alone). It includes no prediction
task and no heartbeat: /ready and the worker registry count prediction workers only.
"""

from shared.celery_app import create_celery_app, quiet_per_task_logs
from shared.settings import get_settings
from worker import kombu_patches

WEBHOOK_QUEUE = "webhooks"
TASK_DELIVER = "webhooks.deliver"

app = create_celery_app(get_settings())
app.conf.include = ["worker.webhooks"]
app.conf.task_default_queue = WEBHOOK_QUEUE
app.conf.task_routes = {TASK_DELIVER: {"queue": WEBHOOK_QUEUE}}
# The same kombu patches as the prediction workers (worker/app.py): a Redis that refuses writes,
# or a broker connection loss, never ends this consumer or loses its messages.
kombu_patches.install()
quiet_per_task_logs(get_settings())
