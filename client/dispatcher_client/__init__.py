"""Python client for model-dispatcher.

    from dispatcher_client import Dispatcher

    with Dispatcher("http://127.0.0.1:8000", api_key="...") as client:
        print(client.predict("linear", {"inputs": [[1, 2, 3]]}))

`AsyncDispatcher` is the same API for asyncio. Failures raise a `DispatcherError` subclass per
error code family; 429/503 and dropped connections are retried under one `Idempotency-Key`, so a
retry never runs a prediction twice. `stream()` yields a task's events as the model produces
them and resumes by itself after a dropped connection.
"""

from ._async import AsyncBatch, AsyncDispatcher, AsyncEventStream, AsyncTask
from ._client import Batch, Dispatcher, EventStream, Task
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
from ._stream import StreamEvent
from ._wire import VERSION as __version__  # noqa: N811  (a constant, by convention lowercase)

__all__ = [
    "AsyncBatch",
    "AsyncDispatcher",
    "AsyncEventStream",
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
    "EventStream",
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
    "StreamEvent",
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
