"""Webhooks against the real stack and a real local HTTP receiver; signatures checked with the
Standard Webhooks reference library (`standardwebhooks`), not with our code.

One stack for the module (2 prediction workers, 1 webhook consumer) with a short retry schedule
(WEBHOOK_RETRY_SCHEDULE=0.5,1,5) and WEBHOOK_TIMEOUT=2; one receiver whose answers are scripted
per path, so each test has its own path.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from devstack import RedisServer, Stack, TorchServe, free_port, wait_until
from tests.support.stack import StackFactory
from tests.support.webhook_receiver import HANG, Received, Receiver

pytestmark = pytest.mark.e2e

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_c2VjcmV0LXRoYXQtaXMtYmVpbmctcm90YXRlZC1vdXQ="
KEY = "hook-key"
WEBHOOK_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def late_port() -> int:
    """A port listed in WEBHOOK_ALLOWED_ORIGINS where nothing listens until a test starts one."""
    return free_port()


@pytest.fixture(scope="module")
def hook_stack(
    redis_server: RedisServer,
    torchserve: TorchServe,
    tmp_path_factory: pytest.TempPathFactory,
    receiver: Receiver,
    late_port: int,
) -> Iterator[Stack]:
    factory = StackFactory(redis_server, torchserve, tmp_path_factory.mktemp("hooks"))
    env = {
        "WEBHOOK_ALLOWED_ORIGINS": f"{receiver.origin},http://127.0.0.1:{late_port},https://*",
        "WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}",
        "WEBHOOK_TIMEOUT": str(WEBHOOK_TIMEOUT),
        "WEBHOOK_RETRY_SCHEDULE": "0.5,1,5",
        "DISPATCHER_API_KEYS": f"{KEY},other-key",
    }
    with factory.running(workers=2, env=env) as stack:
        yield stack


@pytest.fixture
def http(hook_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hook_stack.api_url, timeout=60, headers={"X-API-Key": KEY}) as c:
        yield c


def _path() -> str:
    return "/hook/" + uuid.uuid4().hex[:10]


def _dispatch(http: httpx.Client, url: str, **fields: Any) -> dict[str, Any]:
    body = {"model_name": "echo", "input": {"n": 1}, "webhook": url, **fields}
    answer = http.post("/dispatch_model", json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _deliveries(http: httpx.Client, task_id: str, state: str, timeout: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(http.get(f"/tasks/{task_id}/deliveries").json())
        return seen.get("state") == state

    wait_until(reached, timeout, f"delivery state {state}", 0.1)
    return seen


def _verified(request: Received, secret: str = SECRET) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(request.body, request.headers)
    return payload


def test_500_500_204_is_three_attempts_of_one_signed_event(
    http: httpx.Client, receiver: Receiver
) -> None:
    path = _path()
    receiver.scripts[path] = [500, 500]
    task = _dispatch(http, receiver.origin + path)
    got = receiver.requests(path, 3, 30)
    log = _deliveries(http, task["task_id"], "delivered", 10)
    ids = {request.headers["webhook-id"] for request in got}
    assert len(got) == 3
    assert len(ids) == 1
    for request in got:
        for secret in (SECRET, OLD_SECRET):  # rotation: both signatures are sent
            event = _verified(request, secret)
            assert event["type"] == "task.succeeded"
            assert event["data"]["task_id"] == task["task_id"]
            assert event["data"]["status"] == "succeeded"
            assert event["data"]["prediction_value"] == {"n": 1}
    assert [(a["attempt"], a["status"], a["outcome"]) for a in log["attempts"]] == [
        (1, 500, "retrying"),
        (2, 500, "retrying"),
        (3, 204, "delivered"),
    ]
    assert log["webhook_id"] == ids.pop()
    assert log["attempts"][0]["response"] == "ok"  # a snippet of the answer (204 has none)
    # Owner-scoped: another key sees no such task.
    other = http.get(f"/tasks/{task['task_id']}/deliveries", headers={"X-API-Key": "other-key"})
    assert other.status_code == 404
    print(f"\nRETRIES: gaps {[round(b.at - a.at, 2) for a, b in itertools.pairwise(got)]} s")


def test_every_form_takes_webhook_fields_and_events_can_include_started(
    http: httpx.Client, receiver: Receiver
) -> None:
    path = _path()
    url = receiver.origin + path
    events = "task.started,task.succeeded"
    raw = http.post(
        "/dispatch_model",
        params={"model_name": "echo", "webhook": url, "webhook_events": events},
        content=b"raw bytes",
        headers={"content-type": "application/octet-stream"},
    )
    form = http.post(
        "/dispatch_model",
        data={"model_name": "echo", "webhook": url, "webhook_events": events},
        files={"data": ("a.bin", b"form bytes", "application/octet-stream")},
    )
    listed = http.post(
        "/dispatch_model",
        json={"model_name": "echo", "input": 1, "webhook": url, "webhook_events": [events[:12]]},
    )
    assert raw.status_code == form.status_code == listed.status_code == 200
    got = receiver.requests(path, 5, 20)
    # Deliveries run concurrently, so they may arrive in any order (as with every webhook
    # provider); an event's own timestamp says when it happened.
    by_task = defaultdict(list)
    received = [_verified(request) for request in got]
    for event in sorted(received, key=lambda e: datetime.fromisoformat(e["timestamp"])):
        by_task[event["data"]["task_id"]].append(event["type"])
    assert by_task[raw.json()["task_id"]] == ["task.started", "task.succeeded"]
    assert by_task[form.json()["task_id"]] == ["task.started", "task.succeeded"]
    assert by_task[listed.json()["task_id"]] == ["task.started"]


def test_receiver_down_20_s_then_up_is_delivered(
    http: httpx.Client, late_port: int, receiver: Receiver
) -> None:
    path = _path()
    task = _dispatch(http, f"http://127.0.0.1:{late_port}{path}")
    down_since = time.monotonic()
    wait_until(lambda: time.monotonic() - down_since >= 20, 25, "20 s down", 0.5)
    late = Receiver(port=late_port).start()
    try:
        got = late.requests(path, 1, 30)
        log = _deliveries(http, task["task_id"], "delivered", 10)
    finally:
        late.stop()
    assert _verified(got[0])["type"] == "task.succeeded"
    failed = [a for a in log["attempts"] if a["outcome"] == "retrying"]
    assert len(failed) >= 4
    assert all(a["status"] is None and a["error"] for a in failed)
    print(
        f"\nDOWN 20 s: {len(failed)} failed attempts, delivered "
        f"{got[0].at - down_since:.1f} s after the receiver went down"
    )


def test_410_stops_and_retry_endpoint_resends_the_same_event(
    http: httpx.Client, receiver: Receiver
) -> None:
    path = _path()
    receiver.scripts[path] = [410]
    task = _dispatch(http, receiver.origin + path)
    log = _deliveries(http, task["task_id"], "stopped", 15)
    # A probe answered 500 once, sent after the 410: once its first retry (0.5 s later) has
    # arrived, a retry of the 410 (due as soon, and earlier) would have arrived too.
    probe = _path()
    receiver.scripts[probe] = [500]
    _dispatch(http, receiver.origin + probe)
    receiver.requests(probe, 2, 15)
    assert len(receiver.received[path]) == 1
    assert [(a["status"], a["outcome"]) for a in log["attempts"]] == [(410, "stopped")]
    retried = http.post(f"/tasks/{task['task_id']}/deliveries/retry")
    assert retried.status_code == 202, retried.text
    got = receiver.requests(path, 2, 15)
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"]
    no_hook = _dispatch(http, receiver.origin + path, webhook=None)
    refused = http.post(f"/tasks/{no_hook['task_id']}/deliveries/retry")
    assert refused.status_code == 409
    assert refused.json()["code"] == "no_webhook_event"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://example.com:81/hook", "not in WEBHOOK_ALLOWED_ORIGINS"),
        ("http://127.0.0.1:1/hook", "not in WEBHOOK_ALLOWED_ORIGINS"),
        ("https://10.1.2.3/hook", "private"),
        ("https://127.0.0.1/hook", "private"),
        ("https://[::1]/hook", "private"),
        ("https://169.254.169.254/latest/meta-data", "private"),
        ("https://localhost/hook", "private"),
        ("ftp://127.0.0.1/hook", "http(s)"),
    ],
)
def test_off_list_and_private_addresses_are_refused_before_enqueueing(
    http: httpx.Client, url: str, why: str
) -> None:
    refused = [
        http.post("/dispatch_model", json={"model_name": "echo", "input": 1, "webhook": url}),
        http.post(
            "/dispatch_model",
            params={"model_name": "echo", "webhook": url},
            content=b"x",
            headers={"content-type": "text/plain"},
        ),
    ]
    for answer in refused:
        assert answer.status_code == 403, answer.text
        assert answer.json()["code"] == "webhook_not_allowed"
        assert why in answer.json()["msg"]


def test_sigkill_of_the_webhook_consumer_mid_delivery_delivers_later_with_the_same_id(
    http: httpx.Client, receiver: Receiver, hook_stack: Stack
) -> None:
    path = _path()
    receiver.release.clear()
    receiver.scripts[path] = [HANG]
    task = _dispatch(http, receiver.origin + path)
    receiver.requests(path, 1, 15)  # the consumer is mid-delivery now
    consumer = hook_stack.webhook_consumers[0]
    consumer.kill()
    killed_at = time.monotonic()
    receiver.release.set()
    consumer.launch().wait_ready(60)
    got = receiver.requests(path, 2, 40)
    log = _deliveries(http, task["task_id"], "delivered", 10)
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"]
    assert _verified(got[1])["data"]["task_id"] == task["task_id"]
    assert log["attempts"][-1]["outcome"] == "delivered"
    print(f"\nSIGKILL: redelivered {got[1].at - killed_at:.1f} s after the kill")


async def _sync_dispatches(api_url: str, count: int, webhook: str | None) -> list[float]:
    body: dict[str, Any] = {"model_name": "echo", "input": {"x": 1}}
    if webhook:
        body |= {"webhook": webhook, "webhook_events": ["task.started", "task.succeeded"]}
    async with httpx.AsyncClient(
        base_url=api_url,
        timeout=60,
        headers={"X-API-Key": KEY},
        limits=httpx.Limits(max_connections=count),
    ) as client:

        async def one() -> float:
            started = time.monotonic()
            answer = await client.post("/dispatch_model", json=body)
            assert answer.status_code == 200, answer.text
            return time.monotonic() - started

        return await asyncio.gather(*(one() for _ in range(count)))


def test_a_receiver_that_never_answers_does_not_slow_sync_dispatches(
    hook_stack: Stack, receiver: Receiver, tmp_path: Path
) -> None:
    """No sync answer waits for its webhook: every send hangs until WEBHOOK_TIMEOUT (2 s), so
    dispatches that waited for theirs would take that much longer than without a webhook. How
    much a webhook costs a dispatch is the bench's to measure, not this test's."""
    path = _path()
    receiver.release.clear()
    receiver.scripts[path] = [HANG] * 1000
    try:
        asyncio.run(_sync_dispatches(hook_stack.api_url, 20, None))  # warm-up
        without = asyncio.run(_sync_dispatches(hook_stack.api_url, 100, None))
        with_hook = asyncio.run(_sync_dispatches(hook_stack.api_url, 100, receiver.origin + path))
        again = asyncio.run(_sync_dispatches(hook_stack.api_url, 100, None))
        hanging = len(receiver.received[path])
    finally:
        receiver.release.set()
    base = statistics.median(without + again)
    hooked = statistics.median(with_hook)
    print(
        f"\nDEAD RECEIVER: 100 concurrent sync dispatches p50 {base * 1000:.0f} ms without a "
        f"webhook, {hooked * 1000:.0f} ms with one that never answers ({hanging} sends held)"
    )
    (tmp_path / "numbers.json").write_text(json.dumps({"without": base, "with": hooked}))
    assert hanging >= 1
    assert hooked < base + WEBHOOK_TIMEOUT  # the bound is the behaviour: no answer waited
