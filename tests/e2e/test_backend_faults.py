"""Backends that fail, end to end: each fault ends as issue 17's contract says, and the model
server's own count of calls proves that no call was lost or doubled.

Real redis-server, Celery worker, API and (the default backend) TorchServe; the OIP and OpenAI
backends are scripted servers (tests/support/scripted_backend.py), since no real one can be
made to answer 429 then 200 on cue, refuse a token while echoing it, or come back mid-retry.
Every test runs for an OIP and an OpenAI backend: the retries, deadlines and error mapping are
shared (worker/backends/caller.py, base.status_error), the wires are not. Retries are kept
short (RETRY_* below), so the whole module takes well under a minute once TorchServe is up.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import RedisServer, Stack, TorchServe, free_port, wait_until
from tests.support.scripted_backend import Refusal, ScriptedBackend, Step
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

PROTOCOLS = ("oip", "openai")
# Attempts and backoff: 0.3 s doubling up to 1 s, jittered to half: the four waits between
# five attempts take 1.45-2.9 s, a window a test can see (and a backend can come back in).
ATTEMPTS = 5
MIN_BACKOFFS = 0.15 + 0.3 + 0.5 + 0.5
ENV = {"RETRY_MAX_ATTEMPTS": str(ATTEMPTS), "RETRY_BACKOFF_INITIAL": "0.3",
       "RETRY_BACKOFF_MAX": "1", "WORKER_LOG_TASKS": "true"}  # fmt: skip
# The locked backends are configured with WRONG; their server accepts only RIGHT.
RIGHT_TOKEN = f"sk-right-{uuid.uuid4().hex}"
WRONG_TOKEN = f"sk-wrong-{uuid.uuid4().hex}"
# The backends on the one listening server, each under its own path prefix.
SERVED = ("limited", "busy", "broken", "locked")
ATTEMPT_METRIC = "dispatcher_backend_request_duration_seconds_count"
RETRY_METRIC = "dispatcher_backend_retries_total"


@dataclass
class Faults:
    """The module's stack and its model servers."""

    http: httpx.Client
    stack: Stack
    log_root: Path
    served: ScriptedBackend  # listening: every backend of SERVED, by prefix
    down: ScriptedBackend  # bound, never listening
    revived: dict[str, ScriptedBackend]  # per protocol: down until a test listens
    metrics_url: str


def name(protocol: str, role: str) -> str:
    return f"{protocol}-{role}"


def health_path(protocol: str, backend: str) -> str:
    return f"/{backend}/v2/health/ready" if protocol == "oip" else f"/{backend}/v1/models"


def call_path(protocol: str, backend: str, model: str) -> str:
    if protocol == "oip":
        return f"/{backend}/v2/models/{model}/infer"
    return f"/{backend}/v1/chat/completions"


def config(protocol: str, server: ScriptedBackend, backend: str) -> dict[str, Any]:
    """A BACKENDS entry under the prefix `/<backend>` (OpenAI's given as the SDK's `/v1` URL)."""
    url = f"{server.url}/{backend}" + ("/v1" if protocol == "openai" else "")
    return {"url": url, "protocol": protocol, "connect_timeout": 1, "read_timeout": 5}


def request_input(protocol: str, marker: str) -> dict[str, Any]:
    if protocol == "oip":
        return {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [marker]}]}
    return {"messages": [{"role": "user", "content": marker}], "max_tokens": 4}


def answer(protocol: str, model: str, marker: str) -> dict[str, Any]:
    if protocol == "oip":
        output = {"name": "y", "datatype": "BYTES", "shape": [1], "data": [marker]}
        return {"model_name": model, "outputs": [output]}
    message = {"role": "assistant", "content": marker}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": model, "choices": [choice]}


def error_body(protocol: str, message: str) -> dict[str, Any]:
    if protocol == "oip":
        return {"error": message}
    return {"error": {"message": message, "type": "server_error", "code": None}}


def refusal(protocol: str) -> Refusal:
    """A 401 that echoes the credential it got, as some servers do (the dispatcher must not)."""
    return lambda got: error_body(protocol, f"invalid API key provided: {got}")


@pytest.fixture(scope="module")
def faults(torchserve: TorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    root = tmp_path_factory.mktemp("backend-faults")
    served, down = ScriptedBackend(), ScriptedBackend()
    revived = {protocol: ScriptedBackend() for protocol in PROTOCOLS}
    backends: dict[str, dict[str, Any]] = {}
    for protocol in PROTOCOLS:
        for role in SERVED:
            backend = name(protocol, role)
            backends[backend] = config(protocol, served, backend)
            served.script(health_path(protocol, backend), Step(200, {}), method="GET")
        locked = name(protocol, "locked")
        backends[locked]["token"] = WRONG_TOKEN
        served.require_token(f"/{locked}/", RIGHT_TOKEN, refusal(protocol))
        backends[name(protocol, "down")] = config(protocol, down, name(protocol, "down"))
        back = name(protocol, "back")
        backends[back] = config(protocol, revived[protocol], back)
        revived[protocol].script(health_path(protocol, back), Step(200, {}), method="GET")
    served.listen()
    # A private Redis: the session's may hold other modules' queues.
    factory = StackFactory(RedisServer(root / "redis"), torchserve, root)
    metrics_port = free_port()
    env = {**ENV, "BACKENDS": json.dumps(backends), "WORKER_METRICS_PORT": str(metrics_port),
           "WORKER_METRICS_HOST": "127.0.0.1"}  # fmt: skip
    try:
        stack = factory.start(workers=1, env=env, webhook_consumers=0)
        with httpx.Client(base_url=stack.api_url, timeout=30) as http:
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            yield Faults(http, stack, root, served, down, revived, metrics_url)
    finally:
        factory.stop_all()
        factory.redis_server.stop()
        for server in (served, down, *revived.values()):
            server.stop()


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@dataclass(frozen=True)
class Case:
    """One test's model (a metrics label of its own), body marker and request id."""

    model: str
    marker: str
    request_id: str

    @classmethod
    def fresh(cls) -> Case:
        tag = uuid.uuid4().hex
        return cls(f"m-{tag[:10]}", f"marker-{tag}", f"faults-{tag}")


def dispatch(
    faults: Faults, protocol: str, backend: str, case: Case, *, timeout: float = 30, **params: Any
) -> httpx.Response:
    body = {"backend": backend, "model_name": case.model, "timeout": timeout,
            "input": request_input(protocol, case.marker)}  # fmt: skip
    headers = {"X-Request-ID": case.request_id}
    return faults.http.post("/dispatch_model", json=body, headers=headers, params=params)


def failed(response: httpx.Response, status: int, code: str, backend: str) -> str:
    """The error's message, after checking its status, its code and that it names `backend`."""
    assert response.status_code == status, response.text
    error = response.json()
    assert (error["status"], error["code"]) == (status, code), error
    assert repr(backend) in error["msg"], error
    msg: str = error["msg"]
    return msg


def succeeded(response: httpx.Response, backend: str, expected: Any) -> None:
    assert response.status_code == 200, response.text
    task = response.json()
    assert (task["status"], task["backend"], task["deliveries"]) == ("succeeded", backend, 1)
    assert task["prediction_value"] == expected  # the backend's answer as it sent it


def metric(faults: Faults, sample: str, **labels: str) -> float:
    """A sample of the worker's /metrics (0 when it has none such yet)."""
    text = httpx.get(faults.metrics_url, timeout=5).text
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


def stack_logs(faults: Faults) -> dict[Path, str]:
    logs = {path: path.read_text(errors="replace") for path in faults.log_root.rglob("*.log")}
    assert {"api.log", "worker-1.log"} <= {path.name for path in logs}, sorted(logs)
    return logs


def no_token(text: str, where: object) -> None:
    for token in (WRONG_TOKEN, RIGHT_TOKEN):
        assert token not in text, where


def test_a_backend_that_is_down_fails_after_every_attempt_and_only_it_is_unready(
    faults: Faults, protocol: str
) -> None:
    backend, case = name(protocol, "down"), Case.fresh()
    started = time.monotonic()
    response = dispatch(faults, protocol, backend, case)
    elapsed = time.monotonic() - started
    msg = failed(response, 503, "backend_unavailable", backend)
    assert "cannot connect" in msg, msg
    # Nothing listens to count the calls: the worker's own count of attempts, each refused.
    labels = {"backend": backend, "model": case.model}
    assert metric(faults, ATTEMPT_METRIC, outcome="backend_unavailable", **labels) == ATTEMPTS
    assert metric(faults, RETRY_METRIC, code="backend_unavailable", **labels) == ATTEMPTS - 1
    assert MIN_BACKOFFS - 0.05 <= elapsed < 15, elapsed  # backed off between them, bounded
    task = faults.http.get(f"/tasks/{response.json()['task_id']}").json()
    assert (task["status"], task["backend"], task["deliveries"]) == ("failed", backend, 1)
    assert task["error"]["code"] == "backend_unavailable"

    # Not the default backend: /ready stays 200, and names it as down.
    ready = faults.http.get("/ready")
    assert ready.status_code == 200, ready.text
    report = ready.json()
    assert report["ready"] is True, report
    assert report["checks"]["torchserve"] == "ok", report
    assert backend not in report["checks"], report
    health = report["backends"][backend]
    assert health["gates_readiness"] is False, health
    assert health["health"] != "ok", health
    assert faults.down.url in health["health"], health
    assert report["backends"][name(protocol, "busy")]["health"] == "ok", report
    listed = {info["name"]: info for info in faults.http.get("/backends").json()["backends"]}
    assert listed[backend]["health"] != "ok", listed[backend]
    assert faults.down.url in listed[backend]["health"], listed[backend]
    assert (listed[backend]["default"], listed[backend]["gates_readiness"]) == (False, False)
    assert listed[name(protocol, "busy")]["health"] == "ok", listed


def test_a_backend_that_comes_back_mid_retries_gets_the_call_once(
    faults: Faults, protocol: str
) -> None:
    backend, case = name(protocol, "back"), Case.fresh()
    server, path = faults.revived[protocol], call_path(protocol, backend, case.model)
    expected = answer(protocol, case.model, case.marker)
    server.script(path, Step(200, expected))
    accepted = dispatch(faults, protocol, backend, case, wait=0)
    assert accepted.status_code == 202, accepted.text
    labels = {"backend": backend, "model": case.model, "outcome": "backend_unavailable"}
    wait_until(lambda: metric(faults, ATTEMPT_METRIC, **labels) >= 1, 10, "a refused attempt")
    server.listen()
    task = faults.http.get(f"/tasks/{accepted.json()['task_id']}", params={"wait": 20})
    succeeded(task, backend, expected)
    calls = server.calls(path)
    assert [(c.request_id, c.status) for c in calls] == [(case.request_id, 200)], calls
    assert 1 <= metric(faults, ATTEMPT_METRIC, **labels) < ATTEMPTS
    ok = {**labels, "outcome": "ok"}
    assert metric(faults, ATTEMPT_METRIC, **ok) == 1


def test_429_with_retry_after_is_waited_then_succeeds(faults: Faults, protocol: str) -> None:
    backend, case = name(protocol, "limited"), Case.fresh()
    path = call_path(protocol, backend, case.model)
    expected = answer(protocol, case.model, case.marker)
    limited = Step(429, error_body(protocol, "rate limited"), (("Retry-After", "1"),))
    faults.served.script(path, limited, Step(200, expected))
    succeeded(dispatch(faults, protocol, backend, case), backend, expected)
    calls = faults.served.calls(path, marker=case.marker)
    assert [(c.request_id, c.status) for c in calls] == [(case.request_id, s) for s in (429, 200)]
    # The backoff alone would be 0.15-0.3 s: the second call waited for the Retry-After.
    gap = calls[1].at - calls[0].at
    assert 0.95 <= gap < 3, gap


def test_503_then_200_succeeds_with_two_identical_calls(faults: Faults, protocol: str) -> None:
    backend, case = name(protocol, "busy"), Case.fresh()
    path = call_path(protocol, backend, case.model)
    expected = answer(protocol, case.model, case.marker)
    faults.served.script(path, Step(503, error_body(protocol, "loading")), Step(200, expected))
    succeeded(dispatch(faults, protocol, backend, case), backend, expected)
    calls = faults.served.calls(path, marker=case.marker)
    assert [c.status for c in calls] == [503, 200], calls
    sent = request_input(protocol, case.marker)
    forwarded = sent if protocol == "oip" else {**sent, "model": case.model}
    for call in calls:  # the same call again: its body, and the client's X-Request-ID
        assert call.json() == forwarded
        assert call.request_id == case.request_id
        assert "authorization" not in call.headers  # no token configured: none sent
    assert calls[1].at - calls[0].at >= 0.14  # a backoff, however short


def test_a_wrong_token_is_refused_once_and_never_shown(faults: Faults, protocol: str) -> None:
    backend, case = name(protocol, "locked"), Case.fresh()
    path = call_path(protocol, backend, case.model)
    # The right token would succeed: it is the token, and only the token, that fails the call.
    faults.served.script(path, Step(200, answer(protocol, case.model, case.marker)))
    wrong = {"Authorization": f"Bearer {WRONG_TOKEN}"}
    echoed = httpx.post(faults.served.url + path, headers=wrong)
    assert echoed.status_code == 401
    assert WRONG_TOKEN in echoed.text  # what must not get through
    response = dispatch(faults, protocol, backend, case)
    msg = failed(response, 502, "backend_auth_rejected", backend)
    assert "token" in msg, msg
    assert "[redacted]" in msg, msg  # the server's words, with the token cut out
    calls = faults.served.calls(path, request_id=case.request_id)
    assert [c.status for c in calls] == [401], calls  # not retried
    assert calls[0].headers["authorization"] == f"Bearer {WRONG_TOKEN}"
    task_id = response.json()["task_id"]
    shown = [
        response.text,
        faults.http.get(f"/tasks/{task_id}").text,
        faults.http.get("/ready").text,
        faults.http.get("/backends").text,
        httpx.get(faults.metrics_url, timeout=5).text,
    ]
    for text in shown:
        no_token(text, text)
    # The worker logged the failure (so its log is current), and no log has either token.
    worker_log = faults.stack.workers[0].log_path
    wait_until(lambda: task_id in worker_log.read_text(), 10, "the failure's log line")
    for path_, text in stack_logs(faults).items():
        no_token(text, path_)


def test_a_500_quoting_the_input_is_502_without_its_text(faults: Faults, protocol: str) -> None:
    backend, case = name(protocol, "broken"), Case.fresh()
    path = call_path(protocol, backend, case.model)
    faults.served.script(path, Step(500, echo=True))
    probe = f"probe-{uuid.uuid4().hex}"
    quoted = httpx.post(faults.served.url + path, json=request_input(protocol, probe))
    assert quoted.status_code == 500
    assert probe in quoted.text  # the server does quote its input
    response = dispatch(faults, protocol, backend, case)
    msg = failed(response, 502, "backend_error", backend)
    assert case.marker not in msg, msg
    assert "cannot run" not in msg, msg
    calls = faults.served.calls(path, request_id=case.request_id)
    assert [c.status for c in calls] == [500], calls  # not retried
    assert case.marker not in faults.http.get(f"/tasks/{response.json()['task_id']}").text
    for path_, text in stack_logs(faults).items():
        assert case.marker not in text, path_  # payload bytes are never logged


def test_a_retry_after_past_the_deadline_fails_at_once(faults: Faults, protocol: str) -> None:
    backend, case = name(protocol, "limited"), Case.fresh()
    path = call_path(protocol, backend, case.model)
    limited = Step(429, error_body(protocol, "rate limited"), (("Retry-After", "30"),))
    faults.served.script(path, limited)
    started = time.monotonic()
    response = dispatch(faults, protocol, backend, case, timeout=5)
    elapsed = time.monotonic() - started
    msg = failed(response, 504, "deadline_exceeded", backend)
    assert "Retry-After" in msg, msg
    assert elapsed < 4, elapsed  # it did not sleep into its deadline
    calls = faults.served.calls(path, request_id=case.request_id)
    assert [c.status for c in calls] == [429], calls
