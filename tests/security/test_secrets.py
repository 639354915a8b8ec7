"""Secrets never land in Redis, logs or error bodies: marker secrets on every path, then a scan.

Markers: per-request TorchServe tokens and basic-auth passwords, the configured TORCHSERVE_TOKEN,
the API keys (valid and invalid), the Redis password, WEBHOOK_SECRET and the path and query of a
webhook URL (a receiver's secrets often live there), with a webhook really sent to a local
receiver. After every task has ended, every Redis key (all types, message bodies
base64-decoded), every response, the API's metrics and every log line (API, workers, webhook
consumer) is searched. The one place a webhook URL must be: the records that send it (the
task's record and its webhook event); the secret is nowhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from devstack import RedisServer
from shared.redis_state.keys import EVENT_KEY_PREFIX, TASK_KEY_PREFIX
from tests.support.faults import redis_contents, submit, wait_terminal
from tests.support.stack import StackFactory
from tests.support.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

MARK = uuid.uuid4().hex[:8]
REQUEST_TOKEN = f"reqtoken-{MARK}"
REQUEST_PASSWORD = f"reqpassword-{MARK}"
CONFIGURED_TOKEN = f"cfgtoken-{MARK}"
API_KEY = f"apikey-{MARK}"
WRONG_KEY = f"wrongkey-{MARK}"
REDIS_PASSWORD = f"redispw-{MARK}"
WEBHOOK_KEY = f"whsecretmarker{MARK}"  # base64 text: the secret is whsec_<base64 of its key>
WEBHOOK_SECRET = f"whsec_{WEBHOOK_KEY}AA"
HOOK_PATH = f"hookpath{MARK}"
HOOK_QUERY = f"hookquery{MARK}"
HOOK = f"/{HOOK_PATH}/deliver?sig={HOOK_QUERY}"
URL_MARKERS = [HOOK_PATH, HOOK_QUERY]
MARKERS = [
    REQUEST_TOKEN,
    REQUEST_PASSWORD,
    CONFIGURED_TOKEN,
    API_KEY,
    WRONG_KEY,
    REDIS_PASSWORD,
    WEBHOOK_KEY,
    *URL_MARKERS,
]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(scripts={HOOK: [500]}).start()  # one failed attempt, then delivered
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", password=REDIS_PASSWORD) as server:
        yield server


def test_marker_secrets_are_nowhere_after_the_tasks_end(
    password_redis: RedisServer, stack_factory: StackFactory, receiver: Receiver
) -> None:
    env = {
        "REDIS_URL": password_redis.url,
        "TORCHSERVE_TOKEN": CONFIGURED_TOKEN,
        "DISPATCHER_API_KEYS": API_KEY,
        "RETRY_MAX_ATTEMPTS": "2",
        "WEBHOOK_ALLOWED_ORIGINS": receiver.origin,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_RETRY_SCHEDULE": "0.2",
    }
    stack = stack_factory.start(workers=2, env=env)
    key = {"Authorization": f"Bearer {API_KEY}"}
    creds = {"token": REQUEST_TOKEN}
    basic = {"username": f"user-{MARK}", "password": REQUEST_PASSWORD}
    responses: list[httpx.Response] = []
    with httpx.Client(base_url=stack.api_url, timeout=30, headers=key) as http:

        def post(body: dict[str, object], **kwargs: object) -> httpx.Response:
            response = http.post("/dispatch_model", json=body, **kwargs)  # type: ignore[arg-type]
            responses.append(response)
            return response

        post({"model_name": "echo", "input": {"x": 1}, **creds})
        post({"model_name": "echo", "input": {"x": 2}, **basic})
        post({"model_name": "echo", "input": {"x": 3}})  # the configured token
        post({"model_name": "no_such_model", **creds, **basic})
        post({"model_name": "failing", "input": {}, **creds})
        post({"model_name": "rejecting", "input": {}, **basic})
        post({"model_name": "slow", "input": {"sleep": 2}, "timeout": 0.5, **creds})  # 504
        post({"model_name": "a/b", **creds, **basic})  # 422 before anything is stored
        post({"model_name": "echo", "port": "x", **creds, **basic})
        post({"model_name": "echo", "token": 5, "password": REQUEST_PASSWORD})
        post({"model_name": "echo", "host": "10.9.8.7", **creds})  # 403
        nan = f'{{"model_name": "echo", "input": NaN, "token": "{REQUEST_TOKEN}"}}'
        responses.append(
            http.post("/dispatch_model", content=nan, headers={"content-type": "application/json"})
        )
        post({"model_name": "echo", **creds}, headers={"Authorization": f"Bearer {WRONG_KEY}"})
        post({"model_name": "echo", **creds}, headers={"X-API-Key": WRONG_KEY})
        hooked = post({"model_name": "echo", "input": {"x": 4}, "webhook": receiver.origin + HOOK})
        off_list = f"http://example.com:81{HOOK}"
        post({"model_name": "echo", "webhook": off_list})  # 403, the message without the path
        delivered = receiver.wait(HOOK, 2, 30)  # a 500, then the retry that got a 204
        queued = [
            submit(http, {"model_name": "slow", "input": {"sleep": 0.2}, **creds, **basic})
            for _ in range(4)
        ]
        responses.append(http.delete(f"/tasks/{queued[-1]}"))
        ids = queued + [r.json()["task_id"] for r in responses if "task_id" in r.json()]
        wait_terminal(password_redis.client(), ids, timeout=30)
        responses += [http.get(f"/tasks/{task_id}") for task_id in ids]
        responses.append(http.get("/ready"))
        responses.append(http.get(f"/tasks/{hooked.json()['task_id']}/deliveries"))
        responses.append(http.get("/metrics"))
    stack.stop()  # flush and close every log

    statuses = sorted({r.status_code for r in responses})
    stored = redis_contents(password_redis.client())
    logs = {str(path): path.read_text(errors="replace") for path in stack.log_paths}
    haystacks = {f"response {r.request.url}": r.text for r in responses}
    haystacks |= {f"redis key {k}": "\n".join(v) for k, v in stored.items()}
    haystacks |= {f"log {name}": text for name, text in logs.items()}
    # Where the webhook URL must be stored: the hooked task's record and its events.
    sends_it = {f"redis key {TASK_KEY_PREFIX}{hooked.json()['task_id']}"}
    sends_it |= {f"redis key {k}" for k in stored if k.startswith(EVENT_KEY_PREFIX)}
    print(
        f"\nSECRETS: {len(responses)} responses (statuses {statuses}), {len(stored)} Redis keys, "
        f"{sum(len(t) for t in logs.values())} bytes of logs scanned for {len(MARKERS)} markers"
    )
    assert len(ids) >= 10
    assert {200, 401, 403, 404, 422, 502, 504} <= set(statuses)
    assert any(k.startswith("dispatch:task:") for k in stored)
    assert all(logs.values())
    # The webhook was really sent, signed with the marker secret, and retried once.
    assert hooked.status_code == 200, hooked.text
    for headers, body in delivered:
        event = Webhook(WEBHOOK_SECRET).verify(body, headers)
        assert event["data"]["task_id"] == hooked.json()["task_id"]
    assert len({headers["webhook-id"] for headers, _ in delivered}) == 1
    assert [r.status_code for r in responses if r.request.url.path.endswith("/deliveries")] == [200]
    assert any(f"to 127.0.0.1:{receiver.port}" in text for text in logs.values())  # consumer's
    assert sends_it <= set(haystacks), sends_it
    assert all(HOOK_PATH in haystacks[where] for where in sends_it)  # the URL is where it must be
    leaks = [
        (where, m)
        for where, text in haystacks.items()
        for m in MARKERS
        if m in text and not (m in URL_MARKERS and where in sends_it)
    ]
    assert leaks == []
