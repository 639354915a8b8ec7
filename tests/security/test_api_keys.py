"""API keys: with DISPATCHER_API_KEYS set, everything but /health needs one; tasks, batches,
their webhook deliveries and Idempotency-Keys stay private to the key that made them."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from api.main import create_app
from devstack import RedisServer, wait_until
from shared.redis_state.keys import TASK_KEY_PREFIX
from tests.support.faults import submit
from tests.support.stack import StackFactory
from tests.support.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

KEY_A = "key-a-7d1f0c3e9b"
CONSOLE_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
KEY_B = "key-b-52aa81d6c4"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
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


def console_sign_in(http: httpx.Client, key: str) -> str:
    """Sign `key` in to the console (its session cookie stays in `http`): its CSRF token."""
    form = http.get("/console/signin")
    token = CONSOLE_CSRF.search(form.text)
    assert token, form.text[:300]
    signed = http.post("/console/signin", data={"csrf": token.group(1), "key": key})
    assert signed.status_code == 303, signed.text
    page = http.get("/console/tasks")
    assert page.status_code == 200, page.text[:300]
    token = CONSOLE_CSRF.search(page.text)
    assert token, page.text[:300]
    return token.group(1)


def routes_taking_an_id() -> set[tuple[str, str]]:
    """(method, path) of every route of the app itself with a `{task_id}` or `{batch_id}`: a
    new route is in this set, so it fails the test below until the test covers it too."""
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            context = getattr(route, "include_context", None)
            if context is not None:  # an included router: its routes under its prefix
                walk(context.included_router.routes, prefix + context.prefix)
            elif isinstance(route, APIRoute) and ID_PARAMETER.search(route.path):
                found.update((method, prefix + route.path) for method in route.methods)

    walk(create_app().routes, "")
    return found


ID_PARAMETER = re.compile(r"\{(task_id|batch_id)\}")


def test_another_keys_ids_are_404_on_every_route_and_stay_untouched(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    """B asks for A's tasks and batches on every route that takes an id, while they run and
    after they ended: 404 each time, and A's task, batch and webhook deliveries are as before."""
    receiver = Receiver().start()
    env = {
        "REDIS_URL": dedicated_redis.url,
        "DISPATCHER_API_KEYS": f"{KEY_A},{KEY_B}",
        "WEBHOOK_ALLOWED_ORIGINS": receiver.origin,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    a, b = {"X-API-Key": KEY_A}, {"Authorization": f"Bearer {KEY_B}"}
    hook = "/hook/a-task"
    try:
        stack = stack_factory.start(env=env)
        with httpx.Client(base_url=stack.api_url, timeout=60) as http:
            done = http.post(
                "/dispatch_model",
                json={"model_name": "echo", "input": 1, "webhook": receiver.origin + hook},
                headers=a,
            )
            assert done.status_code == 200, done.text
            done_id = done.json()["task_id"]
            running_id = submit(http, {"model_name": "slow", "input": {"sleep": 5}}, **a)
            ended = http.post(
                "/batches", json={"requests": [{"custom_id": "x", "model_name": "echo"}]}, headers=a
            ).json()["batch_id"]
            assert (
                http.get(f"/batches/{ended}", params={"wait": 30}, headers=a).json()["status"]
                == "completed"
            )
            items = [
                {"custom_id": str(i), "model_name": "slow", "input": {"sleep": 0.25}}
                for i in range(40)
            ]
            running = http.post("/batches", json={"requests": items}, headers=a).json()["batch_id"]
            receiver.wait(hook, 1, 30)
            wait_until(
                lambda: (
                    http.get(f"/tasks/{done_id}/deliveries", headers=a).json()["state"]
                    == "delivered"
                ),
                30,
                "A's webhook delivered",
            )
            deliveries_before = http.get(f"/tasks/{done_id}/deliveries", headers=a).json()
            tasks, batches = f"/tasks/{done_id}", f"/batches/{ended}"
            csrf = console_sign_in(http, KEY_B)  # B's console session: the client's cookie
            as_b = {  # every route taking an id, with A's ids, as B
                ("GET", "/tasks/{task_id}"): [
                    http.get(tasks, headers=b),
                    http.get(tasks, headers=b, params={"wait": 1}),
                    http.get(f"/tasks/{running_id}", headers=b, params={"wait": 1}),
                ],
                ("GET", "/tasks/{task_id}/result"): [http.get(f"{tasks}/result", headers=b)],
                ("GET", "/tasks/{task_id}/stream"): [
                    http.get(f"{tasks}/stream", headers=b),
                    http.get(f"/tasks/{running_id}/stream", headers=b),
                ],
                ("DELETE", "/tasks/{task_id}"): [
                    http.delete(tasks, headers=b),
                    http.delete(f"/tasks/{running_id}", headers=b),
                ],
                ("GET", "/tasks/{task_id}/deliveries"): [
                    http.get(f"{tasks}/deliveries", headers=b)
                ],
                ("POST", "/tasks/{task_id}/deliveries/retry"): [
                    http.post(f"{tasks}/deliveries/retry", headers=b)
                ],
                ("GET", "/batches/{batch_id}"): [
                    http.get(batches, headers=b),
                    http.get(batches, headers=b, params={"wait": 1}),
                    http.get(f"/batches/{running}", headers=b, params={"wait": 1}),
                ],
                ("GET", "/batches/{batch_id}/results"): [http.get(f"{batches}/results", headers=b)],
                ("DELETE", "/batches/{batch_id}"): [
                    http.delete(batches, headers=b),
                    http.delete(f"/batches/{running}", headers=b),
                ],
                ("POST", "/tasks/{task_id}/retry"): [http.post(f"{tasks}/retry", headers=b)],
                ("GET", "/console/tasks/{task_id}"): [
                    http.get(f"/console{tasks}"),
                    http.get(f"/console/tasks/{running_id}"),
                ],
                ("POST", "/console/tasks/{task_id}/retry"): [
                    http.post(f"/console{tasks}/retry", data={"csrf": csrf})
                ],
                ("POST", "/console/tasks/{task_id}/cancel"): [
                    http.post(f"/console/tasks/{running_id}/cancel", data={"csrf": csrf})
                ],
                ("POST", "/console/batches/{batch_id}/cancel"): [
                    http.post(f"/console/batches/{running}/cancel", data={"csrf": csrf})
                ],
            }
            # B's retry, had it worked, would have re-queued the event (state) and, by now (B's
            # long polls took seconds), re-sent it (a new attempt in the log).
            deliveries_after = http.get(f"/tasks/{done_id}/deliveries", headers=a).json()
            task_after = http.get(f"/tasks/{running_id}", headers=a, params={"wait": 30}).json()
            batch_after = http.get(f"/batches/{running}", headers=a, params={"wait": 60}).json()
            result = http.get(f"{tasks}/result", headers=a)
            results = http.get(f"{batches}/results", headers=a)
    finally:
        receiver.stop()
    assert set(as_b) == routes_taking_an_id()
    for (method, path), responses in as_b.items():
        for response in responses:
            assert response.status_code == 404, (method, path, response.text)
            what = "task" if "{task_id}" in path else "batch"
            if path.startswith("/console"):  # an HTML page naming the code
                assert f"{what}_not_found" in response.text, (method, path, response.text)
            else:
                code = response.json()["code"]
                assert code == f"{what}_not_found", (method, path, response.text)
    # Nothing of A's changed: no cancel, no re-sent webhook, results intact.
    assert task_after["status"] == "succeeded"
    assert task_after["cancel_requested"] is False
    assert batch_after["status"] == "completed", batch_after
    assert batch_after["cancel_requested_at"] is None
    assert batch_after["request_counts"]["succeeded"] == 40
    assert deliveries_after == deliveries_before
    assert deliveries_after["state"] == "delivered"
    assert len(receiver.received[hook]) == 1
    assert result.status_code == 200
    assert result.json() == 1
    assert [json.loads(line)["status"] for line in results.text.splitlines()] == ["succeeded"]


def test_an_idempotency_key_is_scoped_to_the_api_key(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    """Another key's same Idempotency-Key is another task (and another batch), never a replay
    of (or a conflict with) the first key's."""
    env = {"REDIS_URL": dedicated_redis.url, "DISPATCHER_API_KEYS": f"{KEY_A},{KEY_B}"}
    stack = stack_factory.start(workers=0, webhook_consumers=0, env=env)
    key = f'"same-{uuid.uuid4().hex}"'
    a = {"X-API-Key": KEY_A, "Idempotency-Key": key}
    b = {"X-API-Key": KEY_B, "Idempotency-Key": key}
    task = {"model_name": "echo", "input": 1}
    batch = {"requests": [{"custom_id": "x", "model_name": "echo"}]}
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        async_ = {"Prefer": "respond-async"}
        first_a = http.post("/dispatch_model", json=task, headers={**a, **async_})
        first_b = http.post("/dispatch_model", json=task, headers={**b, **async_})
        again_a = http.post("/dispatch_model", json=task, headers={**a, **async_})
        again_b = http.post("/dispatch_model", json=task, headers={**b, **async_})
        other_b = http.post("/dispatch_model", json={**task, "input": 2}, headers={**b, **async_})
        batch_a = http.post("/batches", json=batch, headers=a)
        batch_b = http.post("/batches", json=batch, headers=b)
        seen_by_a = http.get(f"/tasks/{first_b.json()['task_id']}", headers={"X-API-Key": KEY_A})
        own_b = http.get(f"/tasks/{first_b.json()['task_id']}", headers={"X-API-Key": KEY_B})
    for response in (first_a, first_b, again_a, again_b, batch_a, batch_b):
        assert response.status_code == 202, response.text
    assert first_b.json()["task_id"] != first_a.json()["task_id"]
    assert "idempotent-replayed" not in first_b.headers  # B's first use is no replay of A's
    assert again_a.json()["task_id"] == first_a.json()["task_id"]
    assert again_b.json()["task_id"] == first_b.json()["task_id"]
    assert (
        again_a.headers["idempotent-replayed"] == again_b.headers["idempotent-replayed"] == "true"
    )
    assert other_b.status_code == 422  # B's key reused with another body: B's own conflict
    assert other_b.json()["code"] == "idempotency_key_reused"
    assert batch_b.json()["batch_id"] != batch_a.json()["batch_id"]
    assert "idempotent-replayed" not in batch_b.headers
    assert seen_by_a.status_code == 404
    assert own_b.status_code == 200
