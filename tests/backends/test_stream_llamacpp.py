"""Streamed OpenAI completions through the dispatcher against a real llama.cpp server (SmolLM2).

Generation is greedy (`temperature: 0`, a fixed `seed` and `max_tokens`), so one request answers
the same text streamed or not, through the dispatcher or straight from the server. A streamed
task is read as a client reads it (tests/support/sse_reader.py), by its `stream_url` and as the
answer of a POST with `Accept: text/event-stream`, for chat and for completions:
- every `output` event is one chunk object as llama.cpp sent it (`chat.completion.chunk` /
  `text_completion`), equal to the server's own streamed chunks but for the per-call `id` and
  `created` (the dispatcher asks `stream_options.include_usage`, so the direct stream does too);
- the joined deltas (`choices[0].delta.content` / `choices[0].text`) are the non-streamed
  answer's content, through the dispatcher and direct;
- `done`'s `prediction_value` is the assembled `chat.completion` / `text_completion`
  (worker/backends/stream_assemble.py), equal to the non-streamed answer in everything but
  `id`, `created`, `system_fingerprint` and `usage`: llama-cpp-python 0.3.36 ignores
  `include_usage` and sends no usage in a stream (its last chunk carries only the finish reason,
  then `[DONE]`; checked on the direct stream here), so the assembled object has none rather
  than a made-up one. Its `id` and `created` are the stream's.
Asking a stream of embeddings is a 422 before queueing; `input.stream: true` is a 422 that
points at the request's own `stream` field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.backends.stack import BackendStack, backend, backend_stack
from tests.support.servers import llamacpp as llamacpp_support
from tests.support.servers.running import RunningServer, client
from tests.support.sse_reader import Reading, read_events

pytestmark = pytest.mark.e2e

MODEL = llamacpp_support.MODEL_ALIAS
CHAT, COMPLETION = llamacpp_support.CHAT, llamacpp_support.COMPLETION
PATHS = {"chat.completions": "/v1/chat/completions", "completions": "/v1/completions"}
INPUTS = {"chat.completions": CHAT, "completions": COMPLETION}
OBJECTS = {  # operation: (a chunk's object, the assembled answer's object)
    "chat.completions": ("chat.completion.chunk", "chat.completion"),
    "completions": ("text_completion", "text_completion"),
}
PER_CALL = ("id", "created", "system_fingerprint")
STREAM_OPTIONS = {"include_usage": True}  # what the dispatcher adds (worker/backends/openai.py)


@pytest.fixture(scope="module")
def dispatcher(
    llama_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackendStack]:
    root = tmp_path_factory.mktemp("stream-llamacpp")
    backends = {"llm": backend(llama_server, "openai")}
    with backend_stack(root, backends, default="llm", env={"RETRY_MAX_ATTEMPTS": "1"}) as stack:
        yield stack


def direct(server: RunningServer, operation: str, stream: bool = False) -> Any:
    """The server's own answer: the completion object, or (streamed) its chunks in order."""
    body: dict[str, Any] = {**INPUTS[operation], "model": MODEL}
    if stream:
        body |= {"stream": True, "stream_options": STREAM_OPTIONS}
    with client(timeout=120.0) as http:
        response = http.post(f"{server.url}{PATHS[operation]}", json=body)
    assert response.status_code == 200, f"{response.status_code}: {response.text}"
    if not stream:
        return response.json()
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    events = [part for part in response.text.split("\n\n") if part.strip()]
    assert events[-1] == "data: [DONE]", events[-3:]
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


def without(value: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: item for key, item in value.items() if key not in keys}


def delta_text(operation: str, chunk: dict[str, Any]) -> str:
    """The text one chunk adds (none for a role-only or a finishing chunk)."""
    [choice] = chunk["choices"]
    text = choice["delta"].get("content") if operation == "chat.completions" else choice["text"]
    return text or ""


def content(operation: str, answer: dict[str, Any]) -> str:
    [choice] = answer["choices"]
    text = choice["message"]["content"] if operation == "chat.completions" else choice["text"]
    assert isinstance(text, str), answer
    return text


def request(operation: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": MODEL, "operation": operation}
    body["input"] = INPUTS[operation]
    return body | ({"stream": True} if stream else {})


def by_stream_url(dispatcher: BackendStack, body: dict[str, Any]) -> tuple[str, Reading]:
    accepted = dispatcher.dispatch(body, wait=0)
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    assert accepted.json()["stream_url"] == f"/tasks/{task_id}/stream"
    return task_id, read_events(dispatcher.http, accepted.json()["stream_url"])


def by_post(dispatcher: BackendStack, body: dict[str, Any]) -> tuple[str, Reading]:
    """POST with a wait and `Accept: text/event-stream`: the answer is the stream itself."""
    reading = read_events(dispatcher.http, "/dispatch_model", method="POST", json_body=body)
    location = re.fullmatch(r"/tasks/([^/]+)/stream", reading.headers.get("content-location", ""))
    assert location is not None, reading.headers
    return location.group(1), reading


READERS: dict[str, Callable[[BackendStack, dict[str, Any]], tuple[str, Reading]]] = {
    "stream_url": by_stream_url,
    "post_accept_sse": by_post,
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("operation", ["chat.completions", "completions"])
def test_streamed_deltas_join_to_the_unstreamed_answer(
    dispatcher: BackendStack, llama_server: RunningServer, operation: str, reader: str
) -> None:
    chunk_object, answer_object = OBJECTS[operation]
    expected = direct(llama_server, operation)
    plain = dispatcher.succeeded(dispatcher.dispatch(request(operation)))["prediction_value"]
    assert without(plain, *PER_CALL) == without(expected, *PER_CALL)
    text = content(operation, expected)
    assert text.strip()

    task_id, reading = READERS[reader](dispatcher, request(operation, stream=True))
    assert reading.status == 200, reading
    kinds = [event.kind for event in reading.events]
    assert kinds == ["output"] * (len(kinds) - 1) + ["done"], kinds
    chunks = [event.json() for event in reading.outputs]
    assert len(chunks) > 2, chunks  # streamed token by token, not as one piece
    assert all(isinstance(c, dict) and c["object"] == chunk_object for c in chunks), chunks
    assert "".join(delta_text(operation, c) for c in chunks) == text
    # The chunks are llama.cpp's own: the same as its direct stream, per-call fields aside.
    server_chunks = direct(llama_server, operation, stream=True)
    assert [without(c, "id", "created") for c in chunks] == [
        without(c, "id", "created") for c in server_chunks
    ]
    assert all("usage" not in c for c in server_chunks)  # llama.cpp sends none when streaming

    done = reading.events[-1].json()
    assert (done["task_id"], done["status"]) == (task_id, "succeeded"), done
    assembled = done["prediction_value"]
    assert assembled["object"] == answer_object
    assert (assembled["id"], assembled["created"]) == (chunks[0]["id"], chunks[0]["created"])
    assert without(assembled, *PER_CALL) == without(expected, *PER_CALL, "usage")
    assert "usage" in expected
    assert "usage" not in assembled  # none was sent, none is made up
    assert content(operation, assembled) == text
    assert dispatcher.task(task_id)["prediction_value"] == assembled


def refused(dispatcher: BackendStack, body: dict[str, Any]) -> dict[str, Any]:
    response = dispatcher.http.post("/dispatch_model", json=body)
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()
    assert error["status"] == 422, error
    assert error.get("task_id") is None, error  # refused before queueing
    return error


def test_a_stream_of_embeddings_is_422(dispatcher: BackendStack) -> None:
    # JSON is the only form an OpenAI backend takes (a form's or raw body's parts are bytes).
    body = {"model_name": MODEL, "operation": "embeddings", "input": {"input": "model dispatcher"}}
    error = refused(dispatcher, {**body, "stream": True})
    assert error["code"] == "unsupported_operation", error
    assert error["msg"] == (
        "stream: embeddings of backend 'llm' (openai) answers whole and cannot stream; "
        "leave stream out"
    ), error


def test_input_stream_points_at_the_requests_own_field(dispatcher: BackendStack) -> None:
    body = {"model_name": MODEL, "operation": "chat.completions",
            "input": {**CHAT, "stream": True}}  # fmt: skip
    error = refused(dispatcher, body)
    assert error["code"] == "unsupported_operation", error
    assert error["msg"].startswith("input.stream: set the request's own stream field"), error
    assert '"stream": true next to input' in error["msg"], error
