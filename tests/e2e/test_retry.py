"""`POST /tasks/{id}/retry` on the real stack: a task that failed at TorchServe (its model was not
loaded yet) runs again once the model is there, with the same payload bytes; a canceled queued
task runs when a worker comes; a payload that is gone is a clear 409; concurrent retries through
two API processes create one task."""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from shared.payloads import CLAIM_CHECK_BYTES
from shared.priorities import Priority, queue_of
from shared.redis_state.keys import message_key, payload_key, queued_key, task_key
from tests.support.faults import wait_terminal
from tests.support.stack import StackFactory, TorchServeFactory

pytestmark = [pytest.mark.e2e]

OCTETS = {"content-type": "application/octet-stream", "Prefer": "respond-async"}
BIG = random.Random(20).randbytes(CLAIM_CHECK_BYTES + 4096)  # claim-checked
KEEP = {"RETRY_KEEP_SECONDS": "600"}


def submit(http: httpx.Client, data: bytes = BIG, model: str = "digest") -> str:
    answer = http.post(
        "/dispatch_model", params={"model_name": model}, content=data, headers=OCTETS
    )
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


def cancel(http: httpx.Client, task_id: str) -> None:
    answer = http.delete(f"/tasks/{task_id}")
    assert (answer.status_code, answer.json()["status"]) == (200, "canceled"), answer.text


def test_a_task_failed_at_torchserve_runs_again_once_fixed(
    stack_factory: StackFactory, torchserve_factory: TorchServeFactory
) -> None:
    torchserve = torchserve_factory.start(("echo.mar",))  # `digest` not loaded yet
    stack = stack_factory.start(workers=1, env={**KEEP, "TORCHSERVE_URL": torchserve.inference_url})
    r: redis.Redis = stack_factory.redis_server.client(decode_responses=True)
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        old = submit(http)
        failed = wait_terminal(stack_factory.redis_server.client(), [old], 60)[old]
        assert failed["status"] == "failed"
        assert '"model_not_found"' in failed["error"]

        torchserve.register("digest.mar")
        answer = http.post(f"/tasks/{old}/retry")
        assert answer.status_code == 202, answer.text
        new = answer.json()["task_id"]
        assert answer.json()["retry_of"] == old
        done = http.get(f"/tasks/{new}", params={"wait": 60}).json()
        assert done["status"] == "succeeded", done
        assert done["prediction_value"]["body"]["sha256"] == hashlib.sha256(BIG).hexdigest()
        assert done["prediction_value"]["body"]["size"] == len(BIG)
        assert http.get(f"/tasks/{old}").json()["retried_as"] == new
        assert r.exists(payload_key(old), payload_key(new)) == 0  # both let go of when done

        again = http.post(f"/tasks/{old}/retry")
        assert (again.status_code, again.json()["task_id"]) == (200, new)


def test_a_canceled_queued_task_runs_when_retried(stack_factory: StackFactory) -> None:
    api_only = stack_factory.start(workers=0, env=KEEP)  # nothing consumes: tasks stay queued
    r: redis.Redis = stack_factory.redis_server.client(decode_responses=True)
    with httpx.Client(base_url=api_only.api_url, timeout=30) as http:
        old = submit(http, b"small enough to ride inline")
        cancel(http, old)
        answer = http.post(f"/tasks/{old}/retry")
        assert answer.status_code == 202, answer.text
        new = answer.json()["task_id"]
        assert answer.json()["status"] == "queued"
        stack_factory.start(workers=1, env=KEEP)  # a worker comes and runs the retry only
        done = http.get(f"/tasks/{new}", params={"wait": 60}).json()
        assert done["status"] == "succeeded", done
        digest = hashlib.sha256(b"small enough to ride inline").hexdigest()
        assert done["prediction_value"]["body"]["sha256"] == digest
        assert r.hget(task_key(old), "status") == "canceled"


def test_a_payload_no_longer_kept_is_a_409(stack_factory: StackFactory) -> None:
    api_only = stack_factory.start(workers=0, env=KEEP)
    r: redis.Redis = stack_factory.redis_server.client(decode_responses=True)
    with httpx.Client(base_url=api_only.api_url, timeout=30) as http:
        payload_gone, copy_gone = submit(http), submit(http)
        cancel(http, payload_gone)
        cancel(http, copy_gone)
        assert r.ttl(payload_key(payload_gone)) > 0  # kept by the cancel
        r.delete(payload_key(payload_gone))
        r.delete(message_key(r.hget(task_key(copy_gone), "message") or ""))
        for old in (payload_gone, copy_gone):
            answer = http.post(f"/tasks/{old}/retry")
            assert answer.status_code == 409, answer.text
            assert answer.json()["code"] == "retry_unavailable"
            assert "no longer kept" in answer.json()["msg"]
        assert r.get(queued_key(queue_of(Priority.default))) == "0"


def test_concurrent_retries_through_two_api_processes_create_one_task(
    stack_factory: StackFactory,
) -> None:
    first, second = (stack_factory.start(workers=0, env=KEEP) for _ in range(2))
    r: redis.Redis = stack_factory.redis_server.client(decode_responses=True)
    with (
        httpx.Client(base_url=first.api_url, timeout=30) as one,
        httpx.Client(base_url=second.api_url, timeout=30) as two,
    ):
        old = submit(one)
        cancel(one, old)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda h: h.post(f"/tasks/{old}/retry"), [one, two] * 8))
    assert sorted(a.status_code for a in answers) == [200] * 15 + [202]
    ids = {a.json()["task_id"] for a in answers}
    assert len(ids) == 1
    (new,) = ids
    assert r.hget(task_key(old), "retried_as") == new
    assert r.get(queued_key(queue_of(Priority.default))) == "1"
    assert r.zrange("dispatch:open", 0, -1) == [new]
