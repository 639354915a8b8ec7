"""No secret, payload or prediction in a log line, with every log switched on.

Like tests/test_security_secrets.py (which scans Redis, responses and logs for secrets), but for
the logs at their most talkative: JSON lines, the API's access log, Celery's per-task lines
(WORKER_LOG_TASKS), retries, failures and rejections, and a webhook really sent (refused once,
then delivered) by the webhook consumer. Marker secrets (tokens, basic-auth passwords, the
configured token, API keys, WEBHOOK_SECRET, the path and query of the webhook URL) and marker
payloads, which the `echo` and `mirror` models send back as predictions, go through every input
form; then the API, worker and webhook consumer logs and every metrics endpoint are searched for
each marker as sent, base64-encoded and JSON-escaped.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from devstack import ApiServer, free_port
from tests.support.faults import wait_terminal
from tests.support.stack import StackFactory
from tests.support.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

MARK = uuid.uuid4().hex[:8]
REQUEST_TOKEN = f"logtoken-{MARK}"
REQUEST_PASSWORD = f"logpassword-{MARK}"
CONFIGURED_TOKEN = f"logcfgtoken-{MARK}"
API_KEY = f"logapikey-{MARK}"
WRONG_KEY = f"logwrongkey-{MARK}"
PAYLOAD = f"logpayload-{MARK}"  # also the prediction of echo and mirror
WEBHOOK_KEY = f"logwhsecretmarker{MARK}"  # base64 text: the secret is whsec_<base64 of its key>
WEBHOOK_SECRET = f"whsec_{WEBHOOK_KEY}AAA"
HOOK_PATH = f"loghookpath{MARK}"
HOOK_QUERY = f"loghookquery{MARK}"
HOOK = f"/{HOOK_PATH}/deliver?sig={HOOK_QUERY}"
SECRETS = [
    REQUEST_TOKEN,
    REQUEST_PASSWORD,
    CONFIGURED_TOKEN,
    API_KEY,
    WRONG_KEY,
    WEBHOOK_KEY,
    HOOK_PATH,
    HOOK_QUERY,
]


def forms(marker: str) -> list[str]:
    """The marker as a log line could carry it: plain, base64 (at 3 alignments), JSON-escaped."""
    variants = {marker, json.dumps(marker)[1:-1]}
    for pad in range(3):
        encoded = base64.b64encode(b"x" * pad + marker.encode()).decode()
        variants.add(encoded[4 * ((pad + 2) // 3) : -4])  # the part that only depends on it
    return sorted(variants)


def test_no_secret_payload_or_prediction_in_any_log_line(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # an allowed TorchServe that refuses connections
    receiver = Receiver(scripts={HOOK: [500, 500]}).start()  # two attempts refused
    worker_metrics, webhook_metrics = free_port(), free_port()
    env = {
        "LOG_FORMAT": "json",
        "WORKER_LOG_TASKS": "true",
        "TORCHSERVE_TOKEN": CONFIGURED_TOKEN,
        "DISPATCHER_API_KEYS": API_KEY,
        "TORCHSERVE_ALLOWED_TARGETS": dead,
        "RETRY_MAX_ATTEMPTS": "3",
        "RETRY_BACKOFF_INITIAL": "0.05",
        "WEBHOOK_ALLOWED_ORIGINS": receiver.origin,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_RETRY_SCHEDULE": "0.2",
        "WORKER_METRICS_HOST": "127.0.0.1",
        "WORKER_METRICS_PORT": str(worker_metrics),
        "WEBHOOK_METRICS_PORT": str(webhook_metrics),
    }
    stack = stack_factory.start(workers=1, env=env, webhook_consumers=1)
    api = ApiServer(stack.env, tmp_path / "api-access.log", access_log=True).start()
    creds = {"token": REQUEST_TOKEN}
    basic = {"username": f"user-{MARK}", "password": REQUEST_PASSWORD}
    payload = {"note": PAYLOAD, "nested": [PAYLOAD]}
    key = {"Authorization": f"Bearer {API_KEY}"}
    statuses: list[int] = []
    task_ids: list[str] = []
    bodies: list[str] = []  # every answer (error bodies included) and every metrics page
    try:
        with httpx.Client(base_url=api.url, timeout=30, headers=key) as http:

            def post(body: dict[str, object] | None = None, **kwargs: object) -> None:
                if body is not None:
                    kwargs["json"] = body
                response = http.post("/dispatch_model", **kwargs)  # type: ignore[arg-type]
                statuses.append(response.status_code)
                bodies.append(response.text)
                if "task_id" in response.text:
                    task_ids.append(response.json()["task_id"])

            host, port = dead.removeprefix("http://").split(":")
            post({"model_name": "echo", "input": payload, **creds})
            post({"model_name": "echo", "input": payload, **basic})
            post({"model_name": "echo", "input": PAYLOAD})  # the configured token
            post({"model_name": "failing", "input": payload, **creds})
            post({"model_name": "rejecting", "input": payload, **basic})
            post({"model_name": "no_such_model", "input": payload, **creds})
            post({"model_name": "echo", "input": payload, "host": host, "port": port, **creds})
            post({"model_name": "slow", "input": {"sleep": 2, "x": PAYLOAD}, "timeout": 0.5})
            post({"model_name": "a/b", "input": payload, **creds})  # 422 before a task
            post(
                content=f'{{"model_name": "echo", "input": "{PAYLOAD}", NaN}}'.encode(),
                headers={"Content-Type": "application/json"},
            )
            post(
                content=b"\x00\x01" + PAYLOAD.encode(),
                params={"model_name": "mirror"},
                headers={"Content-Type": "application/octet-stream"},
            )
            post(
                data={"model_name": "mirror"},
                files={"data": ("x.bin", PAYLOAD.encode(), "application/octet-stream")},
            )
            wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
            post({"model_name": "echo", "input": payload, **creds}, headers=wrong)
            hook = {"webhook": receiver.origin + HOOK}
            post({"model_name": "echo", "input": payload, **hook})
            post(
                data={"model_name": "mirror", **hook},
                files={"data": ("x.bin", PAYLOAD.encode(), "application/octet-stream")},
            )
            post({"model_name": "echo", "webhook": f"http://example.com:81{HOOK}"})  # 403
            with stack_factory.redis_server.client() as client:
                wait_terminal(client, task_ids, timeout=60)
            # Two hooked tasks, one event each, and a retry for each of the two 500s.
            delivered = receiver.wait(HOOK, 4, 30)
            for task_id in task_ids:
                for path in (f"/tasks/{task_id}", f"/tasks/{task_id}/deliveries"):
                    response = http.get(path)
                    statuses.append(response.status_code)
                    bodies.append(response.text)
            bodies.append(http.get("/metrics").text)
        for port in (worker_metrics, webhook_metrics):
            bodies.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    finally:
        api.stop()
        stack.stop()
        receiver.stop()

    logs = {path.name: path.read_text() for path in [api.log_path, *stack.log_paths]}
    lines = [line for text in logs.values() for line in text.splitlines() if line.startswith("{")]
    parsed = [json.loads(line) for line in lines]
    events = " ".join(str(line["event"]) for line in parsed)
    print(
        f"\nLOG SCAN: statuses {sorted(set(statuses))}, {len(task_ids)} tasks, {len(lines)} JSON "
        f"log lines ({sum(len(t) for t in logs.values())} bytes) scanned for "
        f"{len(SECRETS) + 1} markers in {sum(len(forms(m)) for m in [*SECRETS, PAYLOAD])} forms"
    )
    # The logs are talkative: the scan is not of empty files.
    assert {200, 401, 422, 502, 503, 504} <= set(statuses)
    assert len(task_ids) >= 9
    assert "received" in events  # Celery's per-task lines
    assert "succeeded" in events
    assert "retrying" in events  # the refused TorchServe
    assert sum('"POST /dispatch_model' in str(line["event"]) for line in parsed) >= 12
    # The webhooks were really sent, signed with the marker secret; the consumer logged them.
    for headers, body in delivered:
        assert Webhook(WEBHOOK_SECRET).verify(body, headers)["type"] == "task.succeeded"
    assert f"to 127.0.0.1:{receiver.port}: retrying" in events
    assert f"to 127.0.0.1:{receiver.port}: delivered" in events
    assert "dispatcher_webhook_deliveries_total" in " ".join(bodies)
    assert "dispatcher_tasks_submitted_total" in " ".join(bodies)
    # Answers carry the payload back as the prediction, so they are searched for secrets only.
    answers = {f"answer or metrics page {i}": text for i, text in enumerate(bodies)}
    leaks = [
        (name, marker)
        for places, markers in ((logs, [*SECRETS, PAYLOAD]), (answers, SECRETS))
        for name, text in places.items()
        for marker in markers
        for form in forms(marker)
        if form in text
    ]
    assert leaks == []
