"""API keys: with DISPATCHER_API_KEYS set, everything but /health needs one; tasks stay private."""

from __future__ import annotations

import uuid

import httpx
import pytest

from devstack import RedisServer
from shared.redis_state.keys import TASK_KEY_PREFIX
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

KEY_A = "key-a-7d1f0c3e9b"
KEY_B = "key-b-52aa81d6c4"
BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": f"Bearer {KEY_A[:-1]}"},  # a prefix of a valid key
    {"Authorization": f"Bearer {KEY_A}x"},  # a valid key plus one character
    {"Authorization": f"Basic {KEY_A}"},  # a valid key, wrong scheme
    {"Authorization": "Bearer"},
    {"X-API-Key": "wrong-key"},
    {"X-API-Key": KEY_A.upper()},
]


def test_every_endpoint_but_health_needs_a_key(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    env = {"REDIS_URL": dedicated_redis.url, "DISPATCHER_API_KEYS": f"{KEY_A}, {KEY_B}"}
    stack = stack_factory.start(env=env)
    client = dedicated_redis.client()
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        spec = http.get("/openapi.json", headers={"X-API-Key": KEY_A})
        assert spec.status_code == 200, spec.text
        operations = [
            (method.upper(), path.replace("{task_id}", str(uuid.uuid4())))
            for path, methods in spec.json()["paths"].items()
            for method in methods
        ]
        assert len(operations) >= 5
        refused = []
        for method, path in operations:
            for headers in BAD_CREDENTIALS:
                response = http.request(
                    method, path, headers=headers, json={"model_name": "echo", "input": 1}
                )
                if path == "/health":
                    assert response.status_code == 200
                    continue
                refused.append(response)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["code"] == "unauthorized"
                assert "key" in response.json()["msg"]
        assert not list(client.scan_iter(TASK_KEY_PREFIX + "*"))  # a 401 enqueued nothing
        # The documentation stays public (the schema is no secret; a browser sends no key).
        docs = http.get("/docs")
        public_spec = http.get("/openapi.json")
        ready = http.get("/ready", headers={"Authorization": f"bearer {KEY_B}"})
    print(f"\nAPI KEYS: {len(refused)} requests without a valid key, all 401")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    assert public_spec.json() == spec.json()
    assert ready.status_code == 200, ready.text


def test_a_task_is_visible_only_to_the_key_that_created_it(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    env = {"REDIS_URL": dedicated_redis.url, "DISPATCHER_API_KEYS": f"{KEY_A},{KEY_B}"}
    stack = stack_factory.start(env=env)
    a_bearer = {"Authorization": f"Bearer {KEY_A}"}
    a_header = {"X-API-Key": KEY_A}
    b_bearer = {"Authorization": f"Bearer {KEY_B}"}
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        done = http.post(
            "/dispatch_model", json={"model_name": "echo", "input": 1}, headers=a_bearer
        )
        assert done.status_code == 200, done.text
        task = f"/tasks/{done.json()['task_id']}"
        queued = http.post(
            "/dispatch_model",
            json={"model_name": "slow", "input": {"sleep": 1}},
            headers={**a_header, "Prefer": "respond-async"},
        )
        queued_task = f"/tasks/{queued.json()['task_id']}"
        assert http.get(task, headers=a_header).status_code == 200
        as_b = [
            http.get(task, headers=b_bearer),
            http.get(task, headers=b_bearer, params={"wait": 1}),
            http.delete(task, headers=b_bearer),
            http.delete(queued_task, headers=b_bearer),
        ]
        still_running = http.get(queued_task, headers=a_bearer, params={"wait": 10}).json()
    for response in as_b:
        assert response.status_code == 404, response.text
        assert response.json()["code"] == "task_not_found"
    assert still_running["status"] == "succeeded"  # B's cancel did not touch A's task
    assert still_running["cancel_requested"] is False
    owners = {
        fields[b"owner"]
        for key in dedicated_redis.client().scan_iter(TASK_KEY_PREFIX + "*")
        for fields in [dedicated_redis.client().hgetall(key)]
    }
    assert len(owners) == 1
    assert KEY_A.encode() not in owners.pop()  # a hash of the key, never the key
