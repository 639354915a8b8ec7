"""A scripted fake of the dispatcher's HTTP API for dispatcher_client's unit tests
(httpx.MockTransport handlers), and the answers it scripts."""

from __future__ import annotations

from typing import Any

import httpx
from dispatcher_client import RetryPolicy

BASE = "http://dispatcher.test"
TASK = "5f0c1a2b-0000-4000-8000-000000000001"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
FAST = RetryPolicy(max_attempts=4, max_elapsed=10, backoff_initial=0.01, backoff_max=0.02)


def task_body(status: str = "succeeded", **fields: Any) -> dict[str, Any]:
    return {
        "task_id": TASK,
        "status": status,
        "model_name": "echo",
        "created_at": "2026-01-01T00:00:00Z",
        "deadline": "2026-01-01T00:10:00Z",
        **fields,
    }


def error(status: int, code: str, task_id: str | None = None, **headers: str) -> httpx.Response:
    body = {"status": status, "msg": f"{code} happened", "code": code}
    if task_id:
        body["task_id"] = task_id
    return httpx.Response(status, json=body, headers=headers)


def accepted(status: str = "queued") -> httpx.Response:
    body = {"task_id": TASK, "status": status, "status_url": f"/tasks/{TASK}"}
    return httpx.Response(202, json=body, headers={"Location": f"/tasks/{TASK}"})


class Fake:
    """A scripted service: answers from a queue per (method, path), and records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.answers: dict[tuple[str, str], list[httpx.Response | Exception]] = {}

    def on(self, method: str, path: str, *answers: httpx.Response | Exception) -> Fake:
        self.answers.setdefault((method, path), []).extend(answers)
        return self

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        queue = self.answers.get((request.method, request.url.path))
        assert queue, f"unexpected {request.method} {request.url.path}"
        answer = queue.pop(0) if len(queue) > 1 else queue[0]  # the last one repeats
        if isinstance(answer, Exception):
            raise answer
        return answer

    def made(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]
