"""Batches against the real stack: JSON and JSONL, one 422 for every bad item, results in input
order (partial ones too), cancel, the batch.completed webhook, Idempotency-Key, and 10,000 items
enqueued by one request (how fast is the bench's business; the test prints the time it took).

One stack for the module (a general worker, a webhook consumer) on a Redis of its own, so the
queue lengths and keys it checks are only its own.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks import Webhook

from devstack import RedisServer, Stack, TorchServe, free_port, wait_until
from shared.celery_app import TASK_PREDICT_MANY
from shared.priorities import QUEUES, Priority
from shared.redis_state.keys import queued_key
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BATCH_QUEUE = QUEUES[Priority.batch]


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every POST and answers 204."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[dict[str, str], bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def batch_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("batch-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def batch_stack(
    batch_redis: RedisServer,
    torchserve: TorchServe,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    factory = StackFactory(batch_redis, torchserve, tmp_path_factory.mktemp("batch-stack"))
    env = {
        "WEBHOOK_ALLOWED_ORIGINS": f"http://127.0.0.1:{receiver.port}",
        "WEBHOOK_SECRET": SECRET,
    }
    with factory.running(workers=1, env=env) as stack:
        yield stack


@pytest.fixture
def http(batch_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=batch_stack.api_url, timeout=60) as client:
        yield client


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def results(http: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    response = http.get(f"/batches/{batch_id}/results")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def ended(http: httpx.Client, batch_id: str, seconds: float = 60) -> dict[str, Any]:
    """GET ?wait= until the batch ends (one long poll normally; asserts it ended)."""
    view: dict[str, Any] = http.get(f"/batches/{batch_id}", params={"wait": seconds}).json()
    assert view["status"] in ("completed", "canceled"), view
    return view


def test_json_batch_runs_every_item_and_results_come_in_input_order(http: httpx.Client) -> None:
    run = uuid.uuid4().hex[:8]
    requests = [
        {"custom_id": f"{run}-{i}", "model_name": "echo", "input": {"i": i}} for i in range(25)
    ]
    requests.insert(7, {"custom_id": f"{run}-nomodel", "model_name": "no-such-model"})
    created = http.post("/batches", json={"requests": requests})
    assert created.status_code == 202, created.text
    batch = created.json()
    assert created.headers["location"] == f"/batches/{batch['batch_id']}"
    assert batch["status_url"] == created.headers["location"]
    assert batch["status"] == "in_progress"
    assert batch["request_counts"]["total"] == 26

    started = time.monotonic()
    view = ended(http, batch["batch_id"])
    print(f"\nJSON batch of 26 ended in {time.monotonic() - started:.2f} s: {view}")
    assert view["status"] == "completed"
    counts = view["request_counts"]
    assert counts == {
        "total": 26, "queued": 0, "running": 0, "succeeded": 25, "failed": 1, "canceled": 0,
        "expired": 0,
    }  # fmt: skip
    assert view["finished_at"] is not None
    lines = results(http, batch["batch_id"])
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    for line, request in zip(lines, requests, strict=True):
        if request["model_name"] == "echo":
            assert line["status"] == "succeeded"
            assert line["prediction_value"] == request["input"]
        else:
            assert line["status"] == "failed"
            assert line["error"]["code"] == "model_not_found"
    # Every item is a task of its own, tied to the batch, in the batch class.
    task = http.get(f"/tasks/{lines[3]['task_id']}").json()
    assert (task["batch_id"], task["custom_id"]) == (batch["batch_id"], f"{run}-3")
    assert task["priority"] == "batch"
    assert task["prediction_value"] == {"i": 3}


def test_jsonl_upload_with_per_item_priority_and_bytes(http: httpx.Client) -> None:
    png = "data:image/png;base64,iVBORw0KGgo="
    lines = [
        {"custom_id": "a", "model_name": "echo", "input": [1, 2]},
        {"custom_id": "b", "model_name": "echo", "input": "x", "priority": "interactive"},
        {"custom_id": "c", "model_name": "digest", "data": png},
    ]
    body = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    created = http.post("/batches", content=body, headers={"content-type": "application/x-ndjson"})
    assert created.status_code == 202, created.text
    view = ended(http, created.json()["batch_id"])
    assert view["request_counts"]["succeeded"] == 3, view
    got = results(http, view["batch_id"])
    assert [line["custom_id"] for line in got] == ["a", "b", "c"]
    assert got[0]["prediction_value"] == [1, 2]
    assert got[1]["prediction_value"] == "x"
    assert http.get(f"/tasks/{got[1]['task_id']}").json()["priority"] == "interactive"
    assert got[2]["status"] == "succeeded"
    jsonl = http.post(
        "/batches", content=json.dumps(lines[0]), headers={"content-type": "application/jsonl"}
    )
    assert jsonl.status_code == 202, jsonl.text


def test_one_422_lists_every_bad_item_and_nothing_is_enqueued(
    http: httpx.Client, batch_redis: RedisServer
) -> None:
    client = batch_redis.client()
    keys_before = client.dbsize()
    requests: list[Any] = [
        {"custom_id": "ok-0", "model_name": "echo", "input": 0},
        {"model_name": "echo", "input": 1},  # 1: no custom_id
        {"custom_id": "ok-0", "model_name": "echo"},  # 2: duplicate
        {"custom_id": "no-model", "input": 3},  # 3: no model_name
        {"custom_id": "slash", "model_name": "a/b"},  # 4
        {"custom_id": "long", "model_name": "echo", "timeout": 10**7},  # 5
        {"custom_id": "bad-data", "model_name": "echo", "data": "data:image/png,raw"},  # 6
        "not an object",  # 7
        {"custom_id": "ok-8", "model_name": "echo", "priority": "urgent"},  # 8
        {"custom_id": "host", "model_name": "echo", "host": "10.1.2.3"},  # 9
        {"custom_id": "ok-10", "model_name": "echo", "input": 10},
    ]
    response = http.post("/batches", json={"requests": requests})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "invalid_request"
    assert "9 of 11 requests are invalid" in body["msg"]
    errors = {error["index"]: error for error in body["errors"]}
    assert sorted(errors) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert "custom_id" in errors[1]["msg"]
    assert "custom_id" not in errors[1]
    assert errors[2]["custom_id"] == "ok-0"
    assert "earlier" in errors[2]["msg"]
    assert errors[3]["msg"].startswith("model_name")
    assert errors[4]["custom_id"] == "slash"
    assert "model_name" in errors[4]["msg"]
    assert "timeout" in errors[5]["msg"]
    assert "base64" in errors[6]["msg"]
    assert "object" in errors[7]["msg"]
    assert "priority" in errors[8]["msg"]
    assert errors[9]["code"] == "target_not_allowed"
    assert client.dbsize() == keys_before
    assert client.llen(BATCH_QUEUE) == 0

    jsonl = http.post(
        "/batches",
        content='{"custom_id": "a", "model_name": "echo"}\n{not json\n',
        headers={"content-type": "application/x-ndjson"},
    )
    assert jsonl.status_code == 422
    assert jsonl.json()["errors"] == [
        {"index": 1, "code": "invalid_request", "msg": "not valid JSON"}
    ]
    for refused, what in [
        (http.post("/batches", json={"requests": []}), "at least one"),
        (http.post("/batches", json=[{"custom_id": "a"}]), "requests"),
        (http.post("/batches", content=b"x", headers={"content-type": "text/csv"}), "JSONL"),
    ]:
        assert refused.status_code in (415, 422), refused.text
        assert what in refused.json()["msg"]
    assert client.dbsize() == keys_before


def test_partial_results_then_cancel_the_queued_items(http: httpx.Client) -> None:
    requests = [
        {"custom_id": f"s{i}", "model_name": "slow", "input": {"sleep": 0.25}} for i in range(60)
    ]
    batch = http.post("/batches", json={"requests": requests}).json()
    batch_id = batch["batch_id"]
    wait_until(
        lambda: http.get(f"/batches/{batch_id}").json()["request_counts"]["succeeded"] >= 2,
        30,
        "the first items to succeed",
        0.05,
    )
    partial = results(http, batch_id)
    statuses = {line["status"] for line in partial}
    assert [line["custom_id"] for line in partial] == [r["custom_id"] for r in requests]
    assert "succeeded" in statuses, statuses
    assert "queued" in statuses, statuses
    for line in partial:
        assert ("prediction_value" in line) == (line["status"] == "succeeded")

    canceled = http.delete(f"/batches/{batch_id}")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] in ("canceling", "canceled")
    assert canceled.json()["cancel_requested_at"] is not None
    view = ended(http, batch_id)
    print(f"\nafter DELETE: {view['request_counts']}")
    counts = view["request_counts"]
    assert view["status"] == "canceled"
    assert counts["canceled"] > 20, counts
    assert counts["succeeded"] + counts["canceled"] == 60, counts
    after = results(http, batch_id)
    for line in after:
        assert line["status"] in ("succeeded", "canceled")
        if line["status"] == "canceled":
            assert line["error"]["code"] == "canceled"
            assert line["error"]["task_id"] == line["task_id"]
    again = http.delete(f"/batches/{batch_id}")
    assert again.status_code == 409
    assert again.json()["code"] == "batch_finished"
    assert http.get(f"/batches/{uuid.uuid4()}").json()["code"] == "batch_not_found"


def test_batch_completed_webhook_is_signed_and_carries_the_counts(
    http: httpx.Client, receiver: Receiver
) -> None:
    url = f"http://127.0.0.1:{receiver.port}/batches/{uuid.uuid4().hex}"
    requests = [{"custom_id": str(i), "model_name": "echo", "input": i} for i in range(5)]
    created = http.post("/batches", json={"requests": requests, "webhook": url})
    assert created.status_code == 202, created.text
    batch_id = created.json()["batch_id"]
    ended(http, batch_id)
    wait_until(lambda: receiver.received, 30, "the batch.completed webhook", 0.05)
    headers, body = receiver.received[-1]
    event = Webhook(SECRET).verify(body, headers)
    assert event["type"] == "batch.completed"
    assert event["data"]["batch_id"] == batch_id
    assert event["data"]["status"] == "completed"
    assert event["data"]["request_counts"]["succeeded"] == 5
    assert len(receiver.received) == 1  # no task.* events unless asked

    refused = http.post("/batches", json={"requests": requests, "webhook": "http://127.0.0.1:1/x"})
    assert refused.status_code == 403
    assert refused.json()["code"] == "webhook_not_allowed"


def test_idempotency_key_gives_the_same_batch(http: httpx.Client, batch_redis: RedisServer) -> None:
    client = batch_redis.client()
    batches_before = len(list(client.scan_iter("dispatch:batch:*")))
    key = f'"batch-{uuid.uuid4().hex}"'
    body = {"requests": [{"custom_id": "x", "model_name": "echo", "input": 1}]}
    first = http.post("/batches", json=body, headers={"Idempotency-Key": key})
    again = http.post("/batches", json=body, headers={"Idempotency-Key": key})
    other = http.post(
        "/batches",
        json={"requests": [{"custom_id": "y", "model_name": "echo"}]},
        headers={"Idempotency-Key": key},
    )
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.json()["batch_id"] == first.json()["batch_id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"
    assert len(list(client.scan_iter("dispatch:batch:*"))) == batches_before + 1
    ended(http, first.json()["batch_id"])


def queued_tasks(client: redis.Redis, queue: str, most: int) -> list[dict[str, Any]]:
    """The tasks the messages in `queue` carry; each message carries 1..`most`."""
    tasks = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        assert envelope["headers"]["task"] == TASK_PREDICT_MANY
        _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        assert 1 <= len(kwargs["tasks"]) <= most
        tasks.extend(kwargs["tasks"])
    return tasks


def test_enqueueing_10000_items_queues_each_once_in_messages_of_at_most_16(
    stack_factory: StackFactory,
) -> None:
    """No worker consuming, so every item is still queued (and the printed time is the API's and
    Redis's alone)."""
    stack = stack_factory.start(workers=0, webhook_consumers=0)
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    requests = [
        {"custom_id": f"item-{i}", "model_name": "echo", "input": {"text": f"sample {i}"}}
        for i in range(10_000)
    ]
    body = json.dumps({"requests": requests}).encode()
    timings, api_cpu, redis_cpu = [], [], []
    with httpx.Client(base_url=stack.api_url, timeout=60) as http:
        for _ in range(3):
            cpu_before, redis_before = process_cpu(stack.api.pid), redis_cpu_seconds(client)
            started = time.perf_counter()
            response = http.post(
                "/batches", content=body, headers={"content-type": "application/json"}
            )
            timings.append(time.perf_counter() - started)
            api_cpu.append(process_cpu(stack.api.pid) - cpu_before)
            redis_cpu.append(redis_cpu_seconds(client) - redis_before)
            assert response.status_code == 202, response.text
        batch_id = response.json()["batch_id"]
        view = http.get(f"/batches/{batch_id}").json()
    assert view["request_counts"]["queued"] == 10_000
    # Counted in tasks; carried by messages of at most MESSAGE_MAX_TASKS (16) tasks each.
    assert client.get(queued_key(BATCH_QUEUE)) == b"30000"
    carried = [task["id"] for task in queued_tasks(client, BATCH_QUEUE, most=16)]
    assert len(carried) == len(set(carried)) == 30_000
    assert client.hget(f"dispatch:task:{batch_id}-9999", "custom_id") == b"item-9999"
    ms = lambda seconds: ", ".join(f"{t * 1000:.0f}" for t in seconds)  # noqa: E731
    print(
        f"\nPOST /batches with 10,000 items ({len(body) / 1e6:.1f} MB): request to 202 "
        f"{ms(timings)} ms; API CPU {ms(api_cpu)} ms; Redis CPU {ms(redis_cpu)} ms "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
