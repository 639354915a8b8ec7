"""The TorchServe client against a fake remote side (tests/support/upstream_fakes.py): mapping,
retries, what is sent; then with its real pool against a local socket server, and traced."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared import tracing
from shared.errors import (
    DeadlineExceeded,
    DispatchError,
    ModelNotFound,
    ModelRejectedInput,
    TargetNotAllowed,
    TorchServeAuthRejected,
    TorchServeFailed,
    TorchServeTimeout,
    TorchServeUnavailable,
)
from shared.logs import task_context
from shared.models import PredictionCall
from shared.settings import Settings
from tests.support.upstream_fakes import Canned, FakeUpstream, Handler, Sent, answer, error_json
from tests.unit.worker.backends import calls
from tests.unit.worker.http_server import Server, running
from tests.unit.worker.http_server import answer as raw_answer
from worker.backends import Caller
from worker.http_client import ConnectError, ProtocolError, ReadTimeout

ORIGIN = "http://127.0.0.1:8080"


def settings(origin: str = ORIGIN, **overrides: object) -> Settings:
    return Settings(_env_file=None, torchserve_url=origin, **overrides)  # type: ignore[arg-type]


def make_client(handler: Handler, **overrides: object) -> tuple[Caller, FakeUpstream, list[float]]:
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    upstream = FakeUpstream(handler)
    return Caller(settings(ORIGIN, **overrides), upstream, sleep=sleep), upstream, sleeps


def predict(client: Caller, prediction: PredictionCall) -> Any:
    return asyncio.run(client.predict(prediction))


def call(**overrides: object) -> PredictionCall:
    fields: dict[str, object] = {
        "origin": ORIGIN,
        "model_name": "echo",
        "model_version": None,
        "body": {"a": 1},
        "deadline": time.time() + 30,
        "submitted_at": time.time(),
        "priority": "default",
    }
    fields.update(overrides)
    return PredictionCall.model_validate(fields)


def test_success_parses_json_without_content_type() -> None:
    client, upstream, _ = make_client(lambda _: Canned(200, b'{"ok": [1, 2]}'))
    assert predict(client, call(model_version="2.0", body={"a": 1, "é": None})) == {"ok": [1, 2]}
    [sent] = upstream.sent
    assert (sent.method, sent.url) == ("POST", f"{ORIGIN}/predictions/echo/2.0")
    assert sent.body == '{"a":1,"é":null}'.encode()  # compact UTF-8, no escapes
    assert json.loads(sent.body) == {"a": 1, "é": None}
    assert sent.headers == {
        "user-agent": "model-dispatcher",
        "accept": "*/*",
        "accept-encoding": "identity",  # this client does not decompress
        "content-type": "application/json",
    }
    assert sent.read_timeout is not None
    assert 29 < sent.read_timeout <= 30  # the deadline, under the setting's 60 s
    assert all(canned.closed for canned in upstream.answers)


def test_the_request_id_of_the_task_is_sent() -> None:
    client, upstream, _ = make_client(lambda _: answer(200, 1))

    async def scenario() -> None:
        with task_context("t-1", "echo", "req-42"):
            await client.predict(call())
        await client.predict(call())

    asyncio.run(scenario())
    assert [sent.headers.get("x-request-id") for sent in upstream.sent] == ["req-42", None]


def test_non_json_answer_falls_back_to_text() -> None:
    client, _, _ = make_client(lambda _: Canned(200, b"plain words"))
    assert predict(client, call()) == "plain words"


@pytest.mark.parametrize(
    ("response", "error_type", "status", "fragment"),
    [
        (
            error_json(404, "ModelNotFoundException", "Model not found: echo"),
            ModelNotFound,
            404,
            "Model not found: echo",
        ),
        (
            error_json(404, "ModelVersionNotFoundException", "Model version: 9 does not exist"),
            ModelNotFound,
            404,
            "does not exist",
        ),
        (
            error_json(422, "PredictionException", "x must be > 0"),
            ModelRejectedInput,
            422,
            "x must",
        ),
        (error_json(500, "InternalServerException", "Worker died."), TorchServeFailed, 502, "died"),
        (
            error_json(503, "InternalServerException", "Prediction failed"),
            TorchServeFailed,
            502,
            "Prediction failed",
        ),
        (
            error_json(400, "InvalidKeyException", "Token Authorization failed"),
            TorchServeAuthRejected,
            502,
            "TORCHSERVE_TOKEN",
        ),
        (Canned(302, headers={"location": "http://evil"}), TorchServeFailed, 502, "redirect"),
    ],
)
def test_error_answers_map_without_retry(
    response: Canned, error_type: type[DispatchError], status: int, fragment: str
) -> None:
    client, upstream, sleeps = make_client(lambda _: response)
    with pytest.raises(error_type) as caught:
        predict(client, call())
    assert caught.value.status == status
    assert fragment in caught.value.msg
    assert len(upstream.sent) == 1  # the redirect's location is never requested
    assert response.closed
    assert sleeps == []


def test_503_is_retried_with_growing_bounded_backoff_then_fails() -> None:
    client, upstream, sleeps = make_client(
        lambda _: error_json(503, "ServiceUnavailableException", "Model echo has no worker"),
        retry_max_attempts=5,
        retry_backoff_initial=0.1,
        retry_backoff_max=0.3,
    )
    with pytest.raises(TorchServeUnavailable) as caught:
        predict(client, call())
    assert len(upstream.sent) == 5
    assert len(sleeps) == 4
    assert all(0.05 <= delay <= 0.3 for delay in sleeps)
    assert sleeps[-1] > sleeps[0]  # 0.1 -> capped 0.3, jitter at most halves
    assert ORIGIN in caught.value.msg
    assert caught.value.status == 503
    assert all(canned.closed for canned in upstream.answers)


def test_transient_503_then_success() -> None:
    answers = [error_json(503, "ServiceUnavailableException", "busy"), answer(200, 7)]
    client, _, sleeps = make_client(lambda _: answers.pop(0))
    assert predict(client, call()) == 7
    assert len(sleeps) == 1


def test_connection_refused_is_retried_and_names_the_target() -> None:
    def handler(_: Sent) -> Canned:
        raise ConnectError("cannot connect to http://127.0.0.1:8080 (Connection refused)")

    client, upstream, sleeps = make_client(handler, retry_max_attempts=3)
    with pytest.raises(TorchServeUnavailable, match="cannot connect to TorchServe at http"):
        predict(client, call())
    assert len(sleeps) == 2
    assert len(upstream.sent) == 3


def test_read_timeout_is_retried_then_504() -> None:
    def handler(_: Sent) -> Canned:
        raise ReadTimeout("slow")

    client, _, sleeps = make_client(handler, retry_max_attempts=2, torchserve_read_timeout=5)
    with pytest.raises(TorchServeTimeout) as caught:
        predict(client, call())
    assert caught.value.status == 504
    assert "within 5s" in caught.value.msg
    assert len(sleeps) == 1


def test_a_read_timeout_cut_short_by_the_deadline_is_deadline_exceeded() -> None:
    def handler(_: Sent) -> Canned:
        raise ReadTimeout("slow")

    client, upstream, sleeps = make_client(handler, torchserve_read_timeout=60)
    with pytest.raises(DeadlineExceeded, match="still working when the deadline passed"):
        predict(client, call(deadline=time.time() + 0.5))
    assert upstream.sent[0].read_timeout is not None
    assert upstream.sent[0].read_timeout <= 0.5
    assert sleeps == []  # no time left for another attempt


def test_a_broken_connection_is_retried_and_never_names_the_body() -> None:
    def handler(_: Sent) -> Canned:
        raise ProtocolError("http://127.0.0.1:8080 closed the connection mid-answer")

    client, upstream, sleeps = make_client(handler, retry_max_attempts=2)
    with pytest.raises(TorchServeUnavailable) as caught:
        predict(client, call(body={"secret": "s3cret-input"}))
    assert caught.value.msg == f"connection to TorchServe at {ORIGIN} failed (ProtocolError)"
    assert b"s3cret-input" in upstream.sent[0].body
    assert len(sleeps) == 1


def test_no_retry_that_cannot_finish_before_the_deadline() -> None:
    client, _, sleeps = make_client(
        lambda _: error_json(503, "ServiceUnavailableException", "busy"),
        retry_backoff_initial=2.0,
        retry_backoff_max=2.0,
    )
    with pytest.raises(DeadlineExceeded) as caught:
        predict(client, call(deadline=time.time() + 0.5))
    assert caught.value.status == 504
    assert sleeps == []


def test_past_deadline_sends_nothing() -> None:
    client, upstream, _ = make_client(lambda _: answer(200, 1))
    with pytest.raises(DeadlineExceeded):
        predict(client, call(deadline=time.time() - 1))
    assert upstream.sent == []


def test_target_off_the_allow_list_is_refused_without_a_request() -> None:
    def handler(_: Sent) -> Canned:
        raise AssertionError("no request may be sent")

    client, upstream, _ = make_client(handler)
    with pytest.raises(TargetNotAllowed):
        predict(client, call(origin="http://169.254.169.254:80"))
    assert upstream.sent == []


@pytest.mark.parametrize(
    ("overrides", "config", "expected"),
    [
        ({"token": "req-token"}, {"torchserve_token": "default"}, "Bearer req-token"),
        ({}, {"torchserve_token": "default"}, "Bearer default"),
        ({"username": "u", "password": "p"}, {}, "Basic dTpw"),
        ({}, {}, None),
    ],
)
def test_credentials(
    overrides: dict[str, str], config: dict[str, str], expected: str | None
) -> None:
    client, upstream, _ = make_client(lambda _: answer(200, 1), **config)
    predict(client, call(**overrides))
    assert [sent.headers.get("authorization") for sent in upstream.sent] == [expected]


def test_call_repr_hides_credentials() -> None:
    text = repr(call(token="s3cret-token", password="s3cret-pw", username="bob"))
    assert "s3cret" not in text
    assert "/predictions/echo" in text


def test_aclose_closes_the_transport() -> None:
    client, upstream, _ = make_client(lambda _: answer(200, 1))
    asyncio.run(client.aclose())
    assert upstream.closed


# --- the real pool, over sockets ----------------------------------------------------------------


def test_built_before_the_loop_its_own_pool_keeps_one_connection_across_calls() -> None:
    answers = [raw_answer(503, b'{"type": "ServiceUnavailableException", "message": "busy"}')]

    async def routes(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(answers.pop() if answers else raw_answer(200, b'{"echo": %s}' % body))
        await writer.drain()
        return True

    async def scenario(client: Caller, server: Server) -> list[Any]:
        try:
            first = await client.predict(call(origin=server.url))
            second = await client.predict(call(origin=server.url, token="t"))
        finally:
            await client.aclose()
        return [first, second]

    async def main() -> tuple[list[Any], Server]:
        async with running(routes) as server:
            client = Caller(settings(server.url, retry_backoff_initial=0.01))
            return await scenario(client, server), server

    results, server = asyncio.run(main())
    assert results == [{"echo": {"a": 1}}, {"echo": {"a": 1}}]
    assert server.connections == 1  # the 503, its retry and the next call: one connection
    path, headers, body = server.requests[0]
    assert (path, body) == ("/predictions/echo", b'{"a":1}')
    assert headers["Host"] == server.url.removeprefix("http://")
    assert headers["Content-Length"] == "7"
    assert headers["Accept-Encoding"] == "identity"
    assert server.requests[2][1]["Authorization"] == "Bearer t"


def test_with_its_real_pool_a_refused_connection_is_unavailable() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        origin = f"http://127.0.0.1:{unused.getsockname()[1]}"
    client = Caller(settings(origin, retry_max_attempts=1))

    async def scenario() -> None:
        try:
            await client.predict(call(origin=origin))
        finally:
            await client.aclose()

    with pytest.raises(TorchServeUnavailable, match=f"cannot connect to TorchServe at {origin}"):
        asyncio.run(scenario())


# --- tracing ------------------------------------------------------------------------------------


def test_each_attempt_is_a_client_span_of_the_task_whose_traceparent_is_sent() -> None:
    exporter = InMemorySpanExporter()
    assert tracing.setup("torchserve-test", exporter=exporter)
    try:
        answers = [error_json(503, "ServiceUnavailableException", "busy"), answer(200, 1)]
        client, upstream, _ = make_client(lambda _: answers.pop(0), torchserve_token="tok")

        async def scenario() -> None:
            with tracing.task_span("dispatch.predict", {}, {}):
                await client.predict(call(model_version="1.0"))

        asyncio.run(scenario())
        finished = exporter.get_finished_spans()
    finally:
        tracing.shutdown()
    [task] = [span for span in finished if span.kind == SpanKind.CONSUMER]
    attempts = [span for span in finished if span.kind == SpanKind.CLIENT]
    assert [span.name for span in attempts] == ["POST", "POST"]
    for span, sent in zip(attempts, upstream.sent, strict=True):
        assert span.parent is not None
        assert span.parent.span_id == task.context.span_id
        assert span.context.trace_id == task.context.trace_id
        traceparent = sent.headers["traceparent"]
        assert traceparent.split("-")[2] == f"{span.context.span_id:016x}"
        assert span.attributes is not None
        assert span.attributes["url.full"] == f"{ORIGIN}/predictions/echo/1.0"
        assert span.attributes["http.request.method"] == "POST"
        assert "tok" not in str(dict(span.attributes))  # the credentials are never recorded
        assert sent.headers["authorization"] == "Bearer tok"
    statuses = [a.attributes["http.response.status_code"] for a in attempts if a.attributes]
    assert statuses == [503, 200]
    assert not attempts[0].status.is_ok
    assert attempts[1].status.is_unset


def test_untraced_nothing_is_added_to_the_request() -> None:
    assert not tracing.enabled()
    client, upstream, _ = make_client(lambda _: answer(200, 1))
    predict(client, call())
    assert "traceparent" not in upstream.sent[0].headers


def test_a_configured_torchserve_is_named_in_its_errors_and_its_retry_after_waited() -> None:
    backends = {**calls.BACKENDS, "ts2": {"url": "http://127.0.0.1:9300", "protocol": "torchserve"}}
    busy = error_json(503, "ServiceUnavailableException", "busy")
    busy.headers["retry-after"] = "4"
    missing = answer(404, {"code": 404, "type": "ModelNotFoundException", "message": ""})
    replies = iter([busy, missing])
    caller, upstream, sleeps = calls.make_caller(lambda _: next(replies), backends=backends)
    with pytest.raises(ModelNotFound) as caught:
        calls.run(caller, calls.call("ts2", "predictions", body={"x": 1}))
    where = "backend 'ts2' (torchserve) at http://127.0.0.1:9300"
    assert caught.value.msg == f"{where} has no model 'iris'"
    assert len(sleeps) == 1
    assert sleeps[0] >= 4  # its Retry-After; the backoff alone would be about 0.01 s
    assert [sent.url for sent in upstream.sent] == ["http://127.0.0.1:9300/predictions/iris"] * 2
