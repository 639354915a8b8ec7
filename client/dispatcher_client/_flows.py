"""The operations as flows (see `_wire.py`): shared by `Dispatcher` and `AsyncDispatcher`."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from ._errors import TaskCanceled, UnexpectedResponse, WaitTimeout, error_for
from ._models import BackendInfo, BatchInfo, BatchResult, Binary, TaskInfo
from ._retry import RetryPolicy
from ._wire import (
    JSON_TYPE,
    Call,
    Dispatch,
    Flow,
    batch_items,
    check,
    json_call,
    new_idempotency_key,
    prefer_wait,
    read_json,
    send,
)

# The longest single long poll; the server caps it at DISPATCH_MAX_WAIT (300 s by default) and
# answers early once the task ends, so this only bounds how long one HTTP request may stay open.
LONG_POLL = 60.0


def task_path(task_id: str) -> str:
    return f"/tasks/{quote(task_id, safe='')}"


def batch_path(batch_id: str) -> str:
    return f"/batches/{quote(batch_id, safe='')}"


class Deadline:
    """A client-side time limit (None: none)."""

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + max(0.0, seconds)

    def chunk(self) -> float:
        """How long the next server-side wait may be."""
        if self.at is None:
            return LONG_POLL
        return max(0.0, min(LONG_POLL, self.at - time.monotonic()))

    @property
    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


def predict(request: Dispatch, wait: float | None, policy: RetryPolicy) -> Flow[Any]:
    """Dispatch and wait (up to `wait` s, None: until the task ends) for the prediction.

    A sync wait that runs out (202) re-attaches to the task with long polls instead of
    submitting again; the Idempotency-Key makes even a resubmission safe, but a long poll holds
    no request body and is what the 202 asks for.
    """
    deadline = Deadline(wait)
    first_wait = deadline.chunk()
    call = request.call(new_idempotency_key(), prefer_wait(first_wait))
    response = yield from send(dataclasses.replace(call, wait=first_wait), policy)
    if response.status_code == 202:
        task_id = _task_id(read_json(response))
        info = yield from wait_task(task_id, deadline, policy)
    else:
        info = TaskInfo.from_json(read_json(response))
    return (yield from value_of(info, policy))


def _task_id(body: Any) -> str:
    if isinstance(body, Mapping) and isinstance(body.get("task_id"), str):
        return str(body["task_id"])
    raise UnexpectedResponse("the 202 answer has no task_id", code="unexpected_response")


def submit(request: Dispatch, policy: RetryPolicy) -> Flow[str]:
    """Enqueue without waiting; the task's id."""
    response = yield from send(request.call(new_idempotency_key(), "respond-async"), policy)
    return _task_id(read_json(response))


def backends(policy: RetryPolicy) -> Flow[list[BackendInfo]]:
    """`GET /backends`: the server's configured model servers."""
    body = read_json((yield from send(Call("GET", "/backends"), policy)))
    listed = body.get("backends") if isinstance(body, Mapping) else None
    if not isinstance(listed, list):
        raise UnexpectedResponse("GET /backends: no backends list", code="unexpected_response")
    return [BackendInfo.from_json(item) for item in listed]


def status(task_id: str, policy: RetryPolicy, wait: float = 0.0) -> Flow[TaskInfo]:
    params = {"wait": f"{wait:g}"} if wait > 0 else {}
    call = Call("GET", task_path(task_id), params=params, wait=wait)
    return TaskInfo.from_json(read_json((yield from send(call, policy))))


def cancel(task_id: str, policy: RetryPolicy) -> Flow[TaskInfo]:
    response = yield from send(Call("DELETE", task_path(task_id)), policy)
    return TaskInfo.from_json(read_json(response))


def retry(task_id: str, policy: RetryPolicy) -> Flow[TaskInfo]:
    """`POST /tasks/{id}/retry`: the task that retries it (new: 202; made before: 200). Safe to
    resend: the server retries a task once and answers that one to every later call."""
    response = yield from send(Call("POST", f"{task_path(task_id)}/retry"), policy)
    return TaskInfo.from_json(read_json(response))


def wait_task(task_id: str, deadline: Deadline, policy: RetryPolicy) -> Flow[TaskInfo]:
    """Long-poll `/tasks/{id}?wait=N` until the task ends; WaitTimeout when `deadline` passes."""
    while True:
        info = yield from status(task_id, policy, deadline.chunk())
        if info.done:
            return info
        if deadline.passed:
            raise WaitTimeout(
                f"the task is still {info.status}; re-attach with client.task(task_id)",
                code="wait_timeout",
                task_id=task_id,
            )


def result(task_id: str, timeout: float | None, policy: RetryPolicy) -> Flow[Any]:
    info = yield from wait_task(task_id, Deadline(timeout), policy)
    return (yield from value_of(info, policy))


def value_of(info: TaskInfo, policy: RetryPolicy) -> Flow[Any]:
    """The prediction of an ended task, or its error raised.

    An answer that looks like a base64 data URI is fetched from `/tasks/{id}/result`: that says
    with its content type whether the model answered bytes (returned as `Binary`) or merely text
    that happens to start with `data:`.
    """
    if info.status != "succeeded":
        raise _failure(info)
    value = info.prediction_value
    if not (isinstance(value, str) and value.startswith("data:") and ";base64," in value):
        return value
    response = check((yield from send(Call("GET", f"{task_path(info.task_id)}/result"), policy)))
    content_type = response.headers.get("content-type", "application/octet-stream")
    media = content_type.partition(";")[0].strip().lower()
    if media == JSON_TYPE:
        return json.loads(response.content)
    if media.startswith("text/"):
        return response.text
    return Binary(response.content, content_type)


def _failure(info: TaskInfo) -> Exception:
    if info.error is not None:
        return info.error
    if info.status == "canceled":
        return TaskCanceled(
            "the task was canceled", status=409, code="canceled", task_id=info.task_id
        )
    return error_for(0, info.status, f"the task ended {info.status}", info.task_id)


# --- batches ------------------------------------------------------------------------------------


def batch(
    requests: Iterable[Mapping[str, Any]], options: Mapping[str, Any], policy: RetryPolicy
) -> Flow[BatchInfo]:
    body = {"requests": batch_items(requests), **{k: v for k, v in options.items() if v}}
    call = json_call("POST", "/batches", body, {"Idempotency-Key": new_idempotency_key()})
    return BatchInfo.from_json(read_json((yield from send(call, policy))))


def batch_status(batch_id: str, policy: RetryPolicy, wait: float = 0.0) -> Flow[BatchInfo]:
    params = {"wait": f"{wait:g}"} if wait > 0 else {}
    call = Call("GET", batch_path(batch_id), params=params, wait=wait)
    return BatchInfo.from_json(read_json((yield from send(call, policy))))


def batch_wait(batch_id: str, timeout: float | None, policy: RetryPolicy) -> Flow[BatchInfo]:
    """Long-poll the batch until it ends; WaitTimeout when `timeout` passes first."""
    deadline = Deadline(timeout)
    while True:
        info = yield from batch_status(batch_id, policy, deadline.chunk())
        if info.done:
            return info
        if deadline.passed:
            raise WaitTimeout(
                f"batch {batch_id} is still {info.status}: {info.request_counts}",
                code="wait_timeout",
            )


def batch_cancel(batch_id: str, policy: RetryPolicy) -> Flow[BatchInfo]:
    response = yield from send(Call("DELETE", batch_path(batch_id)), policy)
    return BatchInfo.from_json(read_json(response))


def results_call(batch_id: str) -> Call:
    return Call(
        "GET",
        f"{batch_path(batch_id)}/results",
        headers={"Accept": "application/jsonl"},
        stream=True,
    )


def batch_results(batch_id: str, policy: RetryPolicy) -> Flow[httpx.Response]:
    """The open results stream (JSONL), after retries; the caller reads and closes it."""
    return check((yield from send(results_call(batch_id), policy)))


def result_line(line: str) -> BatchResult | None:
    """One JSONL line as a BatchResult (None for a blank line)."""
    if not line.strip():
        return None
    try:
        return BatchResult.from_json(json.loads(line))
    except ValueError:
        raise UnexpectedResponse(
            "a batch results line is not JSON", code="unexpected_response"
        ) from None
