"""Claim-checked payloads: stored once under their own key with the task's TTL, referenced by the
message, deleted when the task ends, expiring with an abandoned task, and surviving a worker
SIGKILL mid-task (the redelivered copy reads them again)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from typing import Any

import httpx
import pytest
import redis

from devstack import CeleryWorker, wait_until
from shared.celery_app import QUEUE
from shared.payloads import CLAIM_CHECK_BYTES, payload_key
from shared.redis_state.keys import task_key
from tests.support.faults import connected_ports, records, wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

OCTETS = {"content-type": "application/octet-stream"}
BIG = CLAIM_CHECK_BYTES + 1


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def queued_calls(client: redis.Redis) -> list[dict[str, Any]]:
    """The `call` of every task in the queue's messages (kombu envelope, base64 body)."""
    calls = []
    for message in client.lrange(QUEUE, 0, -1):
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(message)["body"]))
        calls.extend(task["call"] for task in kwargs["tasks"])
    return calls


def submit_raw(http: httpx.Client, data: bytes, **query: str) -> str:
    response = http.post(
        "/dispatch_model",
        params={"model_name": "digest", **query},
        content=data,
        headers={**OCTETS, "Prefer": "respond-async"},
    )
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def test_big_payloads_are_stored_once_and_deleted_when_the_task_ends(
    stack_factory: StackFactory,
) -> None:
    """A succeeded task's payload goes with its ending; a canceled or expired one's stays
    RETRY_KEEP_SECONDS (here 5 s) for POST /tasks/{id}/retry, then goes too."""
    keep = {"RETRY_KEEP_SECONDS": "5"}
    stack = stack_factory.start(workers=0, env=keep)  # nothing consumes: tasks stay queued
    client: redis.Redis = stack_factory.redis_server.client()
    big, small = blob(BIG, 1), blob(CLAIM_CHECK_BYTES, 2)
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        big_id = submit_raw(http, big)
        small_id = submit_raw(http, small)
        expiring_id = submit_raw(http, big, timeout="1")

        assert client.get(payload_key(big_id)) == big
        record_ttl = client.ttl("dispatch:task:" + big_id)
        assert 0 < client.ttl(payload_key(big_id)) <= record_ttl
        assert not client.exists(payload_key(small_id))  # small: inline in the message
        calls = {call["payload"]["key"] or "inline": call for call in queued_calls(client)}
        # The message carries a reference, not the bytes; a small payload rides inline.
        assert set(calls) == {payload_key(big_id), payload_key(expiring_id), "inline"}
        assert calls[payload_key(big_id)]["payload"]["inline"] is None
        assert base64.b64decode(calls["inline"]["payload"]["inline"]) == small
        sizes = sorted(len(message) for message in client.lrange(QUEUE, 0, -1))
        assert sizes[1] < 5_000  # the two claim-checked messages: a reference, not 87 KB

        assert http.delete(f"/tasks/{big_id}").json()["status"] == "canceled"
        assert 0 < client.ttl(payload_key(big_id)) <= 5  # kept for a retry, 5 s

        # Never started before its deadline: expired (settled on read), its payload kept 5 s.
        wait_until(
            lambda: http.get(f"/tasks/{expiring_id}").json()["status"] == "expired",
            10,
            "the task to expire",
        )
        assert 0 < client.ttl(payload_key(expiring_id)) <= 5
        wait_until(
            lambda: not client.exists(payload_key(big_id), payload_key(expiring_id)),
            15,
            "the kept payloads to expire",
        )

    worker_stack = stack_factory.start(workers=1)
    with httpx.Client(base_url=worker_stack.api_url, timeout=60) as http:
        response = http.post("/dispatch_model?model_name=digest", content=big, headers=OCTETS)
        assert response.status_code == 200, response.text
        assert (
            response.json()["prediction_value"]["body"]["sha256"] == hashlib.sha256(big).hexdigest()
        )
        assert not client.exists(payload_key(response.json()["task_id"]))
    assert not list(client.scan_iter("dispatch:payload:*"))  # every task above has ended


def test_an_abandoned_tasks_payload_expires_with_it(stack_factory: StackFactory) -> None:
    stack = stack_factory.start(workers=0, env={"RESULT_TTL": "2"})
    client: redis.Redis = stack_factory.redis_server.client()
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        task_id = submit_raw(http, blob(BIG))
    assert 0 < client.ttl(payload_key(task_id)) <= 2
    assert 0 < client.ttl(task_key(task_id)) <= 2
    wait_until(lambda: not client.exists(payload_key(task_id)), 10, "the payload to expire")
    # Both keys get the same TTL in one script, by two commands: Redis may expire the payload a
    # millisecond before the record, so "with it" is both gone within moments of each other.
    wait_until(lambda: not client.exists(task_key(task_id)), 1, "the record to expire with it")


def test_sigkilled_worker_mid_task_with_a_6mb_payload_is_redelivered(
    stack_factory: StackFactory,
) -> None:
    env = {
        "BROKER_VISIBILITY_TIMEOUT": "4",
        "WORKER_HEARTBEAT_INTERVAL": "1",
        "DISPATCH_DEFAULT_TIMEOUT": "120",
    }
    stack = stack_factory.start(workers=1, env=env)
    client: redis.Redis = stack_factory.redis_server.client()
    data = blob(6_000_000, 3)
    with httpx.Client(base_url=stack.api_url, timeout=60) as http:
        response = http.post(
            "/dispatch_model",
            data={"model_name": "digest", "sleep": "2"},
            files={"data": ("big.bin", data, "application/octet-stream")},
            headers={"Prefer": "respond-async"},
        )
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        wait_until(
            lambda: records(client, [task_id])[task_id].get("status") == "running",
            20,
            "the task to start",
        )
        # Killed inside its 2 s TorchServe call, so after it has read the payload.
        victim = stack.workers[0]
        torchserve_port = int(stack_factory.torchserve.inference_url.rsplit(":", 1)[1])
        wait_until(
            lambda: torchserve_port in connected_ports(victim.pid),
            20,
            "the call to TorchServe",
            0.02,
        )
        victim.kill()
        log = stack_factory.log_root / "worker-2.log"
        stack.workers.append(CeleryWorker(stack.env, "worker2", log).start())
        final = wait_terminal(client, [task_id], timeout=60)[task_id]
        view = http.get(f"/tasks/{task_id}").json()
    assert final["status"] == "succeeded", view
    assert int(final["deliveries"]) == 2
    received = view["prediction_value"]["data"]
    assert received["sha256"] == hashlib.sha256(data).hexdigest()
    assert received["size"] == len(data)
    assert not client.exists(payload_key(task_id))
