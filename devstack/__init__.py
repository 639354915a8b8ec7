"""The real stack on this machine (Redis, TorchServe, workers, the API): make run, tests, bench."""

from devstack.models import (
    DEMO_MODELS_DIR,
    PAYLOAD_MODULE,
    REPO_ROOT,
    archive_demo_model,
    archive_demo_models,
)
from devstack.processes import (
    ManagedProcess,
    ProcessServer,
    StopsOnExit,
    free_port,
    proc_stats,
    wait_until,
)
from devstack.redis import RedisServer
from devstack.services import ApiServer, CeleryWorker
from devstack.stack import Stack, start_stack
from devstack.torchserve import TorchServe, archive_model

__all__ = [
    "DEMO_MODELS_DIR",
    "PAYLOAD_MODULE",
    "REPO_ROOT",
    "ApiServer",
    "CeleryWorker",
    "ManagedProcess",
    "ProcessServer",
    "RedisServer",
    "Stack",
    "StopsOnExit",
    "TorchServe",
    "archive_demo_model",
    "archive_demo_models",
    "archive_model",
    "free_port",
    "proc_stats",
    "start_stack",
    "wait_until",
]
