"""What the backend tests share: settings with BACKENDS, a Caller on a fake upstream whose
sleeps are recorded instead of slept, and calls as the API would enqueue them."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from shared.errors import DispatchError
from shared.models import PredictionCall
from shared.settings import Settings
from tests.support.upstream_fakes import Canned, FakeUpstream, Handler, Sent
from worker.backends import Answer, Caller

OIP_ORIGIN = "http://127.0.0.1:9100"
OPENAI_ORIGIN = "http://127.0.0.1:9200"
OIP_TOKEN = "oip-s3cret-token"
OPENAI_TOKEN = "sk-s3cret-token"
BACKENDS: dict[str, dict[str, Any]] = {
    "mls": {"url": OIP_ORIGIN, "protocol": "oip"},
    "kserve": {
        "url": f"{OIP_ORIGIN}/serving/",
        "protocol": "oip",
        "token": OIP_TOKEN,
        "connect_timeout": 0.5,
        "read_timeout": 7,
    },
    "llm": {"url": f"{OPENAI_ORIGIN}/v1", "protocol": "openai", "token": OPENAI_TOKEN},
    "tgi": {"url": OPENAI_ORIGIN, "protocol": "openai", "max_calls": 3},
}


def settings(**overrides: object) -> Settings:
    fields: dict[str, object] = {"backends": BACKENDS, "retry_backoff_initial": 0.01}
    fields.update(overrides)
    return Settings(_env_file=None, **fields)  # type: ignore[arg-type]


def make_caller(handler: Handler, **overrides: object) -> tuple[Caller, FakeUpstream, list[float]]:
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    upstream = FakeUpstream(handler)
    return Caller(settings(**overrides), upstream, sleep=sleep), upstream, sleeps


def call(backend: str, operation: str, **overrides: object) -> PredictionCall:
    now = time.time()
    fields: dict[str, object] = {
        "origin": "http://api-side.invalid:1",  # what the API resolved; the worker's settings rule
        "model_name": "iris",
        "model_version": None,
        "body": {"inputs": []},
        "backend": backend,
        "operation": operation,
        "deadline": now + 30,
        "submitted_at": now,
        "priority": "default",
    }
    fields.update(overrides)
    return PredictionCall.model_validate(fields)


def run(caller: Caller, prediction: PredictionCall, payload: bytes | None = None) -> Answer:
    return asyncio.run(caller.predict_answer(prediction, payload))


def json_answer(status: int, value: Any, **headers: str) -> Canned:
    """A JSON answer, with its Content-Type as OIP and OpenAI servers send it."""
    return Canned(
        status, json.dumps(value).encode(), {"content-type": "application/json", **headers}
    )


def with_bytes(
    backend: str, operation: str, *parts: dict[str, Any], multipart: bool = False,
    **overrides: object,
) -> PredictionCall:  # fmt: skip
    """A call whose input is bytes: `parts` as the API's PayloadRef lists them (name, size...)."""
    payload = {"parts": list(parts), "multipart": multipart}
    return call(backend, operation, body=None, payload=payload, **overrides)


def sequence(*answers: Canned) -> Handler:
    """A handler giving `answers` one per request, in order (a request more fails the test)."""
    pending = list(answers)

    def handler(_: Sent) -> Canned:
        assert pending, "more requests than scripted answers"
        return pending.pop(0)

    return handler


def no_request(_: Sent) -> Canned:
    """A handler for calls that must be refused before anything is sent."""
    raise AssertionError("no request may be sent")


def failure(
    caller: Caller, prediction: PredictionCall, payload: bytes | None = None
) -> DispatchError:
    """The DispatchError the call raised; the test fails if it succeeded or raised another."""
    try:
        run(caller, prediction, payload)
    except DispatchError as error:
        return error
    raise AssertionError("the call succeeded")


def binary_answer(header: dict[str, Any], *tails: bytes, length: str | None = None) -> Canned:
    """An OIP answer with binary outputs: the JSON header, then `tails` back to back;
    `length`: an Inference-Header-Content-Length other than the header's."""
    head = json.dumps(header).encode()
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)) if length is None else length,
    }
    return Canned(200, head + b"".join(tails), headers)
