"""What the API and the workers share: settings, models, errors, records, the Celery app."""

from shared.celery_app import QUEUE, TASK_PREDICT_MANY, create_celery_app, encode_task_message
from shared.errors import DispatchError
from shared.models import PredictionRequest, TaskError, TaskStatus, TaskView
from shared.settings import Settings, get_settings

__all__ = [
    "QUEUE",
    "TASK_PREDICT_MANY",
    "DispatchError",
    "PredictionRequest",
    "Settings",
    "TaskError",
    "TaskStatus",
    "TaskView",
    "create_celery_app",
    "encode_task_message",
    "get_settings",
]
