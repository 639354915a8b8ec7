"""The dispatcher in front of real llama.cpp OpenAI servers (SmolLM2-135M), against direct calls.

`prediction_value` is the completion object as the server sent it. Generation is greedy
(`temperature: 0`, a fixed `seed` and `max_tokens`), so the text is fixed; a completion's `id`
and `created` are the server's per call, so the comparison is of everything else: each choice's
message (role, content) or text, its finish_reason, the usage counts, `object` and `model`.
Embeddings: llama.cpp on one CPU answers the same floats bit for bit for the same text (three
direct calls were identical when this was written; test_servers_direct.py asserts it), and
the dispatcher stores floats as JSON numbers that read back to the same doubles, so the whole
embedding response is compared exactly, not to a tolerance. `model` is set from `model_name`
(the inputs here carry none). A backend with a token sends it as Bearer to a server started
with `--api_key` (the same server without the token is 401 -> 502 backend_auth_rejected), and
the token is in no log line of the stack. /backends reports every server healthy with its
model.

One stack for the module: `llm` (the default; chat and completions), `emb` (the
`--embedding True` server), `keyed` (the `--api_key` server, with the key as token) and
`keyless` (that server without it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.backends.stack import LLAMA_API_KEY, BackendStack, backend, backend_stack
from tests.support.servers import llamacpp as llamacpp_support
from tests.support.servers.running import RunningServer, client

pytestmark = pytest.mark.e2e

MODEL = llamacpp_support.MODEL_ALIAS
CHAT, COMPLETION = llamacpp_support.CHAT, llamacpp_support.COMPLETION
# What two calls of one completion share: all but the server's per-call id and timestamp.
PER_CALL = ("id", "created", "system_fingerprint")


@pytest.fixture(scope="module")
def dispatcher(
    llama_server: RunningServer,
    llama_embedding_server: RunningServer,
    llama_keyed_server: RunningServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BackendStack]:
    backends = {
        "llm": backend(llama_server, "openai"),
        "emb": backend(llama_embedding_server, "openai"),
        "keyed": backend(llama_keyed_server, "openai", token=LLAMA_API_KEY),
        "keyless": backend(llama_keyed_server, "openai"),
    }
    root = tmp_path_factory.mktemp("dispatch-llamacpp")
    # One attempt: a refused token is not retried anyway, and nothing here should need two.
    with backend_stack(root, backends, default="llm", env={"RETRY_MAX_ATTEMPTS": "1"}) as stack:
        yield stack


def direct(
    server: RunningServer, path: str, body: dict[str, Any], token: str | None = None
) -> dict[str, Any]:
    """The server's own answer to `body` (with `model` set, as the dispatcher sets it)."""
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    with client(timeout=120.0) as http:
        response = http.post(f"{server.url}{path}", json={**body, "model": MODEL}, headers=headers)
    assert response.status_code == 200, f"{response.status_code}: {response.text}"
    answer: dict[str, Any] = response.json()
    return answer


def comparable(completion: dict[str, Any]) -> dict[str, Any]:
    """A completion less what differs per call."""
    return {key: value for key, value in completion.items() if key not in PER_CALL}


def dispatched(
    dispatcher: BackendStack, body: dict[str, Any], operation: str, name: str = "llm"
) -> dict[str, Any]:
    request = {"model_name": MODEL, "backend": name, "operation": operation, "input": body}
    done = dispatcher.succeeded(dispatcher.dispatch(request))
    assert done["backend"] == name
    answer: dict[str, Any] = done["prediction_value"]
    return answer


def test_chat_completion_equals_direct(
    dispatcher: BackendStack, llama_server: RunningServer
) -> None:
    expected = direct(llama_server, "/v1/chat/completions", CHAT)
    answer = dispatched(dispatcher, CHAT, "chat.completions")
    assert comparable(answer) == comparable(expected)
    [choice] = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == llamacpp_support.chat(llama_server)  # the helper's
    assert (answer["object"], answer["model"]) == ("chat.completion", MODEL)
    assert answer["id"] != expected["id"]  # two calls, as the server counts them


def test_chat_is_the_default_operation_of_the_default_backend(
    dispatcher: BackendStack, llama_server: RunningServer
) -> None:
    expected = direct(llama_server, "/v1/chat/completions", CHAT)
    done = dispatcher.succeeded(dispatcher.dispatch({"model_name": MODEL, "input": CHAT}))
    assert (done["backend"], done["operation"]) == ("llm", None)
    assert comparable(done["prediction_value"]) == comparable(expected)


def test_completion_equals_direct(dispatcher: BackendStack, llama_server: RunningServer) -> None:
    expected = direct(llama_server, "/v1/completions", COMPLETION)
    answer = dispatched(dispatcher, COMPLETION, "completions")
    assert comparable(answer) == comparable(expected)
    [choice] = answer["choices"]
    assert choice["finish_reason"] == "length"  # 16 tokens, cut off
    assert answer["usage"]["completion_tokens"] == COMPLETION["max_tokens"]
    assert choice["text"].strip()


def test_async_completion_equals_direct(
    dispatcher: BackendStack, llama_server: RunningServer
) -> None:
    expected = direct(llama_server, "/v1/completions", COMPLETION)
    request = {"model_name": MODEL, "operation": "completions", "input": COMPLETION}
    accepted = dispatcher.dispatch(request, wait=0)
    assert accepted.status_code == 202, accepted.text
    view = dispatcher.task(accepted.json()["task_id"])
    assert view["status"] == "succeeded", view
    assert (view["backend"], view["operation"]) == ("llm", "completions")
    assert comparable(view["prediction_value"]) == comparable(expected)


@pytest.mark.parametrize("text", ["model dispatcher", ["first text", "a second, longer text"]])
def test_embeddings_equal_direct_exactly(
    dispatcher: BackendStack, llama_embedding_server: RunningServer, text: str | list[str]
) -> None:
    body = {"input": text}
    expected = direct(llama_embedding_server, "/v1/embeddings", body)
    answer = dispatched(dispatcher, body, "embeddings", name="emb")
    assert answer == expected  # every float, bit for bit
    rows = answer["data"]
    assert len(rows) == (1 if isinstance(text, str) else len(text))
    assert all(row["embedding"] for row in rows)


def test_a_token_is_sent_as_bearer(
    dispatcher: BackendStack, llama_keyed_server: RunningServer
) -> None:
    with client() as http:
        refused = http.post(
            f"{llama_keyed_server.url}/v1/chat/completions", json={**CHAT, "model": MODEL}
        )
    assert refused.status_code == 401  # the server does want the key
    expected = direct(llama_keyed_server, "/v1/chat/completions", CHAT, token=LLAMA_API_KEY)
    answer = dispatched(dispatcher, CHAT, "chat.completions", name="keyed")
    assert comparable(answer) == comparable(expected)

    keyless = dispatcher.dispatch({"model_name": MODEL, "backend": "keyless", "input": CHAT})
    assert keyless.status_code == 502, keyless.text
    error = keyless.json()
    assert error["code"] == "backend_auth_rejected"
    assert error["msg"].startswith("backend 'keyless' (openai) at http://127.0.0.1:")
    assert "refused the credentials (401)" in error["msg"]
    assert LLAMA_API_KEY not in dispatcher.logs(lines=100_000)


def test_backends_list_each_server_healthy_with_its_model(dispatcher: BackendStack) -> None:
    listed = dispatcher.backend_list()
    for name in ("llm", "emb", "keyed"):
        info = listed[name]
        assert (info["protocol"], info["health"], info["models"]) == ("openai", "ok", [MODEL])
        assert info["operations"] == ["chat.completions", "completions", "embeddings"]
        assert info["takes_bytes"] is False
    assert listed["llm"]["default"] is True
    # The keyed server refuses GET /v1/models without the key: not healthy, and no key shown.
    assert listed["keyless"]["health"] != "ok"
    assert LLAMA_API_KEY not in str(listed)
    ready = dispatcher.http.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["backends"]["keyed"]["health"] == "ok"
