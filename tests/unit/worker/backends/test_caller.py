"""The Caller (worker/backends/caller.py) with configured OIP and OpenAI backends, on a fake
upstream whose sleeps are recorded, not slept: attempts and their backoff, Retry-After as a
minimum delay, the deadline, what is never retried, X-Request-ID, a backend or operation the
worker lacks, and each backend's own timeouts."""

from __future__ import annotations

import asyncio
import re
import time
from email.utils import formatdate

import pytest

from shared.errors import (
    BackendAuthRejected,
    BackendFailed,
    BackendNotConfigured,
    BackendTimeout,
    BackendUnavailable,
    DeadlineExceeded,
    DispatchError,
    ModelNotFound,
    ModelRejectedInput,
)
from shared.logs import request_context, task_context
from tests.support.upstream_fakes import Canned, Sent
from tests.unit.worker.backends.calls import (
    OIP_ORIGIN,
    OPENAI_ORIGIN,
    call,
    failure,
    json_answer,
    make_caller,
    no_request,
    run,
    sequence,
)
from worker.http_client import ConnectError, ProtocolError, ReadTimeout

OK: dict[str, list[object]] = {"outputs": []}


def busy(status: int = 503, retry_after: str | None = None) -> Canned:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    return json_answer(status, {"error": "busy"}, **headers)


@pytest.mark.parametrize("status", [503, 429])
def test_busy_then_ok_is_retried_once(status: int) -> None:
    caller, upstream, sleeps = make_caller(sequence(busy(status), json_answer(200, OK)))
    assert run(caller, call("kserve", "infer")).value == OK
    assert len(upstream.sent) == 2
    assert upstream.sent[0].url == upstream.sent[1].url
    assert upstream.sent[0].body == upstream.sent[1].body  # the same request again
    assert upstream.sent[0].headers == upstream.sent[1].headers
    assert len(sleeps) == 1
    assert 0.005 <= sleeps[0] <= 0.01  # RETRY_BACKOFF_INITIAL 0.01, jitter at most halves it
    assert all(canned.closed for canned in upstream.answers)


def http_date(seconds: float) -> str:
    """A Retry-After date `seconds` from now (built in the test: collection is long before)."""
    return formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize(("retry_after", "least"), [("2", 2.0), ("0.75", 0.75), (None, 4.5)])
def test_retry_after_is_waited_at_least(retry_after: str | None, least: float) -> None:
    value = http_date(6) if retry_after is None else retry_after  # None: as an HTTP date
    answers = sequence(busy(503, value), busy(429, value), json_answer(200, OK))
    caller, upstream, sleeps = make_caller(answers, retry_backoff_max=0.05)
    assert run(caller, call("llm", "chat.completions")).value == OK
    assert len(upstream.sent) == 3
    assert len(sleeps) == 2
    assert all(least <= delay <= 6.0 for delay in sleeps)  # the backoff alone is <= 0.05


def test_a_retry_after_shorter_than_the_backoff_does_not_shorten_it() -> None:
    answers = sequence(busy(503, "0"), json_answer(200, OK))
    caller, _, sleeps = make_caller(answers, retry_backoff_initial=1.0, retry_backoff_max=1.0)
    run(caller, call("mls", "infer"))
    assert len(sleeps) == 1
    assert 0.5 <= sleeps[0] <= 1.0


def test_gives_up_after_retry_max_attempts_with_bounded_growing_backoff() -> None:
    caller, upstream, sleeps = make_caller(
        lambda _: busy(503), retry_max_attempts=5, retry_backoff_initial=0.1, retry_backoff_max=0.3
    )
    error = failure(caller, call("mls", "infer"))
    assert isinstance(error, BackendUnavailable)
    assert (error.status, error.code) == (503, "backend_unavailable")
    assert f"backend 'mls' (oip) at {OIP_ORIGIN} is unavailable (503): busy" in error.msg
    assert len(upstream.sent) == 5
    assert len(sleeps) == 4
    assert 0.05 <= sleeps[0] <= 0.1  # 0.1, then 0.2, then capped at 0.3; jitter halves at most
    assert all(0.15 <= delay <= 0.3 for delay in sleeps[2:])
    assert all(canned.closed for canned in upstream.answers)


def test_one_attempt_means_no_retry() -> None:
    caller, upstream, sleeps = make_caller(lambda _: busy(503), retry_max_attempts=1)
    assert isinstance(failure(caller, call("mls", "infer")), BackendUnavailable)
    assert (len(upstream.sent), sleeps) == (1, [])


def test_no_retry_that_cannot_finish_before_the_deadline() -> None:
    caller, upstream, sleeps = make_caller(
        lambda _: busy(503), retry_backoff_initial=2.0, retry_backoff_max=2.0
    )
    error = failure(caller, call("mls", "infer", deadline=time.time() + 0.8))
    assert isinstance(error, DeadlineExceeded)
    assert (error.status, error.code) == (504, "deadline_exceeded")
    assert error.msg.startswith(f"deadline passed while retrying {OIP_ORIGIN}: ")
    assert "is unavailable (503): busy" in error.msg
    assert isinstance(error.__cause__, BackendUnavailable)
    assert (len(upstream.sent), sleeps) == (1, [])


@pytest.mark.parametrize(("retry_after", "said"), [("120", r"120s"), (None, r"29\d\.\d+s")])
def test_a_retry_after_past_the_deadline_says_so(retry_after: str | None, said: str) -> None:
    value = http_date(300) if retry_after is None else retry_after
    caller, upstream, sleeps = make_caller(lambda _: busy(429, value))
    error = failure(caller, call("llm", "completions"))  # 30 s left
    assert isinstance(error, DeadlineExceeded)
    assert re.search(
        f"asked to be retried in {said} \\(Retry-After\\), past the task's deadline$", error.msg
    )
    assert "backend 'llm' (openai)" in error.msg
    assert "is rate limiting (429): busy" in error.msg
    assert (len(upstream.sent), sleeps) == (1, [])  # it fails now, not in 30 s


def test_a_deadline_already_passed_sends_nothing() -> None:
    caller, upstream, _ = make_caller(no_request)
    error = failure(caller, call("kserve", "infer", deadline=time.time() - 1))
    assert isinstance(error, DeadlineExceeded)
    assert upstream.sent == []


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (json_answer(400, {"error": "bad"}), ModelRejectedInput),
        (json_answer(404, {"error": "no such model"}), ModelNotFound),
        (json_answer(401, {"error": "no"}), BackendAuthRejected),
        (json_answer(500, {"error": "boom"}), BackendFailed),
        (json_answer(502, {"error": "bad gateway"}), BackendFailed),
        (Canned(301, headers={"location": "http://elsewhere"}), BackendFailed),
    ],
)
@pytest.mark.parametrize("target", [("kserve", "infer"), ("llm", "embeddings")])
def test_a_non_retryable_error_is_not_retried(
    target: tuple[str, str], reply: Canned, kind: type[DispatchError]
) -> None:
    caller, upstream, sleeps = make_caller(lambda _: reply, retry_max_attempts=5)
    error = failure(caller, call(*target))
    assert isinstance(error, kind)
    assert not error.retryable
    assert (len(upstream.sent), sleeps) == (1, [])


def test_a_refused_connection_is_retried_and_names_the_backend() -> None:
    def refuse(_: Sent) -> Canned:
        raise ConnectError("cannot connect to http://127.0.0.1:9200 (Connection refused)")

    caller, upstream, sleeps = make_caller(refuse, retry_max_attempts=3)
    error = failure(caller, call("tgi", "completions"))
    assert isinstance(error, BackendUnavailable)
    assert error.msg == f"cannot connect to backend 'tgi' (openai) at {OPENAI_ORIGIN}"
    assert (len(upstream.sent), len(sleeps)) == (3, 2)


def test_a_broken_connection_is_retried_then_succeeds() -> None:
    attempts: list[Sent] = []

    def flaky(sent: Sent) -> Canned:
        attempts.append(sent)
        if len(attempts) == 1:
            raise ProtocolError("closed the connection mid-answer")
        return json_answer(200, OK)

    caller, _, sleeps = make_caller(flaky)
    assert run(caller, call("mls", "infer")).value == OK
    assert (len(attempts), len(sleeps)) == (2, 1)


def test_a_read_timeout_is_the_backends_timeout_after_its_attempts() -> None:
    def slow(_: Sent) -> Canned:
        raise ReadTimeout("slow")

    caller, upstream, sleeps = make_caller(slow, retry_max_attempts=2)
    error = failure(caller, call("kserve", "infer"))
    assert isinstance(error, BackendTimeout)
    assert (error.status, error.code) == (504, "backend_timeout")
    assert error.msg == f"backend 'kserve' (oip) at {OIP_ORIGIN} did not answer within 7s"
    assert (len(upstream.sent), len(sleeps)) == (2, 1)


def test_a_read_timeout_cut_short_by_the_deadline_is_deadline_exceeded() -> None:
    def slow(_: Sent) -> Canned:
        raise ReadTimeout("slow")

    caller, upstream, sleeps = make_caller(slow)
    error = failure(caller, call("kserve", "infer", deadline=time.time() + 2))
    assert isinstance(error, DeadlineExceeded)
    assert "still working when the deadline passed" in error.msg
    timeout = upstream.sent[0].read_timeout
    assert timeout is not None
    assert 0.5 < timeout <= 2  # what was left, under the backend's 7 s
    assert sleeps == []


def test_each_backends_own_timeouts_reach_the_transport() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, OK))
    run(caller, call("kserve", "infer"))  # connect_timeout 0.5, read_timeout 7
    run(caller, call("mls", "infer"))  # the defaults: 2 and 60, cut to the deadline's 30
    run(caller, call("llm", "embeddings", deadline=time.time() + 300))
    timeouts = [(sent.connect_timeout, sent.read_timeout) for sent in upstream.sent]
    assert timeouts[0] == (0.5, 7)
    assert timeouts[1][0] == 2.0
    assert timeouts[1][1] is not None
    assert 29 < timeouts[1][1] <= 30
    assert timeouts[2] == (2.0, 60.0)


def test_every_attempt_sends_the_default_headers_and_the_request_id() -> None:
    caller, upstream, _ = make_caller(sequence(busy(503), *[json_answer(200, OK)] * 3))

    async def scenario() -> None:
        with task_context("t-1", "iris", "req-42", backend="kserve"):
            await caller.predict_answer(call("kserve", "infer"))  # two attempts
        with request_context("req-43"):
            await caller.predict_answer(call("llm", "completions"))
        await caller.predict_answer(call("mls", "infer"))

    asyncio.run(scenario())
    assert [sent.headers.get("x-request-id") for sent in upstream.sent] == [
        "req-42",
        "req-42",
        "req-43",
        None,  # no request: no header, not an empty one
    ]
    for sent in upstream.sent:
        assert sent.headers["user-agent"] == "model-dispatcher"
        assert sent.headers["accept-encoding"] == "identity"


def test_a_backend_this_worker_lacks_is_not_configured_and_nothing_is_sent() -> None:
    caller, upstream, _ = make_caller(no_request)
    error = failure(caller, call("elsewhere", "infer"))
    assert isinstance(error, BackendNotConfigured)
    assert (error.status, error.code, error.retryable) == (503, "backend_not_configured", False)
    assert "backend 'elsewhere' is not configured on this worker" in error.msg
    assert "configured here: kserve, llm, mls, tgi, torchserve" in error.msg
    assert caller.backend(call("elsewhere", "infer")) is None
    assert upstream.sent == []


@pytest.mark.parametrize(
    ("backend", "operation"),
    [("mls", "chat.completions"), ("llm", "infer"), ("kserve", "predictions"), ("tgi", "x")],
)
def test_an_operation_the_protocol_lacks_is_not_configured(backend: str, operation: str) -> None:
    caller, upstream, _ = make_caller(no_request)
    error = failure(caller, call(backend, operation))
    assert isinstance(error, BackendNotConfigured)
    assert f"has no operation {operation!r}" in error.msg
    assert upstream.sent == []


def test_the_worker_calls_the_backend_it_configures_not_the_messages_origin() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, OK))
    prediction = call("mls", "infer", origin="http://169.254.169.254:80")
    run(caller, prediction)
    assert upstream.sent[0].url.startswith(OIP_ORIGIN + "/")
    backend = caller.backend(prediction)
    assert backend is not None
    assert (backend.name, backend.origin) == ("mls", OIP_ORIGIN)


def test_a_header_with_a_line_break_is_a_failed_connection_not_a_crash() -> None:
    def refuse(_: Sent) -> Canned:
        raise ValueError("a header must not contain a line break")

    caller, _, _ = make_caller(refuse, retry_max_attempts=1)
    error = failure(caller, call("mls", "infer"))
    assert isinstance(error, BackendUnavailable)
    assert error.msg == f"connection to backend 'mls' (oip) at {OIP_ORIGIN} failed (ValueError)"


def test_predict_is_the_answers_value_and_aclose_closes_the_transport() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, OK))
    assert asyncio.run(caller.predict(call("mls", "infer"))) == OK
    asyncio.run(caller.aclose())
    assert upstream.closed
