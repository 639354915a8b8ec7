"""The worker's Celery app: `celery -A worker.app worker -Q dispatch`."""

import logging

from shared.celery_app import create_celery_app
from shared.settings import get_settings

# Module-level because Celery's CLI loads the app by name; settings come from the environment.
app = create_celery_app(get_settings())
app.conf.include = ["worker.tasks", "worker.heartbeat"]
# httpx logs every request at INFO: one line per task that Celery's own lines already cover.
logging.getLogger("httpx").setLevel(logging.WARNING)
