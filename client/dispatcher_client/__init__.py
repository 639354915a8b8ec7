"""Python client for model-dispatcher.

    from dispatcher_client import Dispatcher

    with Dispatcher("http://127.0.0.1:8000", api_key="...") as client:
        print(client.predict("linear", {"inputs": [[1, 2, 3]]}))

`AsyncDispatcher` is the same API for asyncio. Failures raise a `DispatcherError` subclass per
error code family; 429/503 and dropped connections are retried under one `Idempotency-Key`, so a
retry never runs a prediction twice.
"""

from ._async import AsyncBatch, AsyncDispatcher, AsyncTask
from ._client import Batch, Dispatcher, Task
from ._errors import (
    BatchNotFound,
    Conflict,
    DispatcherError,
    Forbidden,
    InvalidRequest,
    ModelFailed,
    ModelNotFound,
    ModelRejectedInput,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServiceUnavailable,
    TaskCanceled,
    TaskNotFound,
    TaskTimeout,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
    WaitTimeout,
)
from ._models import (
    BackendInfo,
    BatchInfo,
    BatchResult,
    Binary,
    RequestCounts,
    TaskInfo,
    decode_data_uri,
)
from ._retry import RetryPolicy
from ._wire import VERSION as __version__  # noqa: N811  (a constant, by convention lowercase)

__all__ = [
    "AsyncBatch",
    "AsyncDispatcher",
    "AsyncTask",
    "BackendInfo",
    "Batch",
    "BatchInfo",
    "BatchNotFound",
    "BatchResult",
    "Binary",
    "Conflict",
    "Dispatcher",
    "DispatcherError",
    "Forbidden",
    "InvalidRequest",
    "ModelFailed",
    "ModelNotFound",
    "ModelRejectedInput",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "RequestCounts",
    "RetryPolicy",
    "ServiceUnavailable",
    "Task",
    "TaskCanceled",
    "TaskInfo",
    "TaskNotFound",
    "TaskTimeout",
    "TransportError",
    "Unauthorized",
    "UnexpectedResponse",
    "WaitTimeout",
    "__version__",
    "decode_data_uri",
]
