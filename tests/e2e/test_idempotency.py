"""Idempotency-Key against the real stack: replays attach to the one task, the model runs once.

The session TorchServe's `counting` model logs every request; each test tags its inputs with a
unique id and counts them there (tests/faults.py `model_calls`).
"""

from __future__ import annotations

import concurrent.futures
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import RedisServer, Stack, wait_until
from tests.support.faults import model_calls
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

REPLAYED = "Idempotent-Replayed"


def _post(
    http: httpx.Client, body: dict[str, Any], key: str | None, **headers: str
) -> httpx.Response:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return http.post("/dispatch_model", json=body, headers={**extra, **headers})


def _run_id() -> str:
    return "idem-" + uuid.uuid4().hex[:10]


def test_replay_after_completion_answers_the_same_result_without_a_second_call(
    stack: Stack, counting_log: Path
) -> None:
    run = _run_id()
    body = {"model_name": "counting", "input": {"id": run}}
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        first = _post(http, body, f'"{run}"')
        again = _post(http, body, f'"{run}"')
        bare = _post(http, body, run)  # the same key as a bare token
    assert first.status_code == 200, first.text
    assert REPLAYED not in first.headers
    for replay in (again, bare):
        assert replay.status_code == 200, replay.text
        assert replay.headers[REPLAYED] == "true"
        assert replay.json() == first.json()
    assert model_calls(counting_log, run) == {run: 1}


def test_replay_while_running_reattaches_and_waits_like_a_fresh_request(
    stack: Stack, counting_log: Path
) -> None:
    run = _run_id()
    body = {"model_name": "counting", "input": {"id": run, "sleep": 3}}
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        accepted = _post(http, body, run, Prefer="respond-async")
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["task_id"]
        wait_until(
            lambda: http.get(f"/tasks/{task_id}").json()["status"] == "running", 10, "running"
        )
        still_running = _post(http, body, run, Prefer="respond-async")
        finished = _post(http, body, run, Prefer="wait=20")  # a retried sync request
    assert still_running.status_code == 202
    assert still_running.json()["task_id"] == task_id
    assert still_running.headers["Location"] == f"/tasks/{task_id}"
    assert still_running.headers[REPLAYED] == "true"
    assert finished.status_code == 200, finished.text
    assert finished.json()["task_id"] == task_id
    assert finished.headers[REPLAYED] == "true"
    assert model_calls(counting_log, run) == {run: 1}


def test_replay_while_queued_and_changed_request_is_422_with_nothing_enqueued(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    stack = stack_factory.start(workers=0, env={"REDIS_URL": dedicated_redis.url})
    client = dedicated_redis.client()
    run = _run_id()
    body = {"model_name": "counting", "input": {"id": run}}
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        first = _post(http, body, run, Prefer="respond-async")
        queued = _post(http, body, run, Prefer="wait=1")
        depth = client.llen("dispatch")
        changed = _post(http, {**body, "input": {"id": run, "x": 1}}, run, Prefer="respond-async")
        other_model = _post(http, {**body, "model_name": "echo"}, run, Prefer="respond-async")
        other_timeout = _post(http, {**body, "timeout": 30}, run, Prefer="respond-async")
        tasks_after = len(list(client.scan_iter("dispatch:task:*")))
    assert first.status_code == 202
    assert queued.status_code == 202, queued.text
    assert queued.json()["task_id"] == first.json()["task_id"]
    assert queued.json()["status"] == "queued"
    assert queued.headers[REPLAYED] == "true"
    for refused in (changed, other_model, other_timeout):
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "idempotency_key_reused"
    assert client.llen("dispatch") == depth == 1
    assert tasks_after == 1


def test_twenty_concurrent_first_requests_make_one_task_and_one_model_call(
    stack: Stack, counting_log: Path
) -> None:
    run = _run_id()
    body = {"model_name": "counting", "input": {"id": run, "sleep": 1}}

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=stack.api_url, timeout=30) as http:
            return _post(http, body, run)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(post, range(20)))
    assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers]
    assert len({a.json()["task_id"] for a in answers}) == 1
    assert sum(REPLAYED in a.headers for a in answers) == 19
    assert model_calls(counting_log, run) == {run: 1}


def test_keys_are_scoped_per_api_key_and_refused_requests_store_nothing(
    dedicated_redis: RedisServer, stack_factory: StackFactory, counting_log: Path
) -> None:
    stack = stack_factory.start(
        workers=1,
        env={
            "REDIS_URL": dedicated_redis.url,
            "DISPATCHER_API_KEYS": "key-one,key-two",
            "TORCHSERVE_ALLOWED_TARGETS": "",
        },
    )
    client = dedicated_redis.client()
    run = _run_id()
    body = {"model_name": "counting", "input": {"id": run}}
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        # Refused before enqueueing: a malformed key (400), an invalid body (422) and an
        # off-list target (403) with a well-formed key leave nothing under it.
        malformed = _post(http, body, '"unterminated', **{"X-API-Key": "key-one"})
        too_long = _post(http, body, "k" * 256, **{"X-API-Key": "key-one"})
        invalid = _post(http, {"input": 1}, run, **{"X-API-Key": "key-one"})
        off_list = _post(http, {**body, "host": "10.0.0.1"}, run, **{"X-API-Key": "key-one"})
        stored_after_refusals = list(client.scan_iter("dispatch:idem:*"))
        one = _post(http, body, run, **{"X-API-Key": "key-one"})
        two = _post(http, body, run, **{"X-API-Key": "key-two"})
        one_again = _post(http, body, run, **{"X-API-Key": "key-one"})
    for bad in (malformed, too_long):
        assert bad.status_code == 400, bad.text
        assert bad.json()["code"] == "invalid_idempotency_key"
        assert "Idempotency-Key" in bad.json()["msg"]
    assert invalid.status_code == 422
    assert off_list.status_code == 403
    assert stored_after_refusals == []
    assert one.status_code == two.status_code == one_again.status_code == 200
    assert one.json()["task_id"] != two.json()["task_id"]
    assert one_again.json()["task_id"] == one.json()["task_id"]
    assert REPLAYED not in two.headers
    assert model_calls(counting_log, run) == {run: 2}


def test_a_429_stores_nothing_under_the_key(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    stack = stack_factory.start(
        workers=0, env={"REDIS_URL": dedicated_redis.url, "MAX_QUEUE_DEPTH": "1"}
    )
    client = dedicated_redis.client()
    run = _run_id()
    body = {"model_name": "counting", "input": {"id": run}}
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        first = _post(http, body, run + "-a", Prefer="respond-async")
        full = _post(http, body, run + "-b", Prefer="respond-async")
    assert first.status_code == 202
    assert full.status_code == 429, full.text
    assert len(list(client.scan_iter("dispatch:idem:*"))) == 1
