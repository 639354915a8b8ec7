"""The model servers the dispatcher calls: named backends, each speaking one protocol.

`BACKENDS` (a JSON object, shared/settings.py) names them; the TorchServe at `TORCHSERVE_URL`
is always there as `torchserve`, so a deployment that configures nothing works as before. The
API resolves a request to a `Target` (which backend, which origin, which operation) and the
message carries the backend's name and the operation, never its token: a worker looks the
backend up in its own settings, so a message cannot point a worker at a server (or a
credential) the operator did not configure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# The name TORCHSERVE_URL's backend always has, and the default of DEFAULT_BACKEND.
TORCHSERVE = "torchserve"
BACKEND_NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,62}$"


class Protocol(str, Enum):
    """How a backend is called; each has its own client in worker/backends/."""

    torchserve = "torchserve"  # TorchServe's inference API: /predictions/{model}[/{version}]
    oip = "oip"  # Open Inference Protocol v2 (KServe, MLServer, Triton): /v2/models/{model}/infer
    openai = "openai"  # OpenAI-compatible (vLLM, llama.cpp, TGI, SGLang): /v1/chat/completions


# Per protocol, the operations a request may pick with `operation`; the first is the default.
OPERATIONS: Mapping[Protocol, tuple[str, ...]] = {
    Protocol.torchserve: ("predictions", "explanations"),
    Protocol.oip: ("infer", "generate"),
    Protocol.openai: ("chat.completions", "completions", "embeddings"),
}


def normalize_origin(url: str) -> str:
    """`scheme://host:port` of a URL, with the scheme's default port made explicit.

    Allow-list checks compare these strings, so `http://h` and `http://h:80/` are one target.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Not the URL itself: a malformed one may still hold a password.
        raise ValueError("not an http(s) URL with a host (`http://host:port`)")
    if parts.username or parts.password:
        raise ValueError("model server URLs must not carry credentials; use a token setting")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def decode_backends(value: object) -> object:
    """BACKENDS as the settings read it (a JSON string) to the object its entries validate from,
    refusing the name `torchserve` and names that could not be a metrics label or a path part."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as error:
            raise ValueError(f"BACKENDS: not JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError('BACKENDS: a JSON object of named backends, {"name": {...}}')
    for name in value:
        if name == TORCHSERVE:
            raise ValueError(
                "BACKENDS: the name 'torchserve' is TORCHSERVE_URL's backend; configure it "
                "with TORCHSERVE_URL and TORCHSERVE_TOKEN, or give this one another name"
            )
        if not re.fullmatch(BACKEND_NAME_PATTERN, str(name)):
            raise ValueError(
                f"BACKENDS: backend name {str(name)[:70]!r}: lowercase letters, digits, "
                "`_`, `-`; at most 63 characters"
            )
    return value


class BackendConfig(BaseModel):
    """One entry of `BACKENDS`, as the operator writes it (unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    url: str = Field(
        description="The server's root, `http(s)://host:port[/prefix]`; the protocol's paths "
        "(`/v2/...`, `/v1/...`) are appended. An OpenAI base URL ending in `/v1` is accepted."
    )
    protocol: Protocol
    token: SecretStr | None = Field(None, description="Sent as `Authorization: Bearer`.")
    connect_timeout: float = Field(2.0, gt=0, description="Connect timeout per attempt (s).")
    read_timeout: float = Field(60.0, gt=0, description="Read timeout per attempt (s).")
    max_calls: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        None,
        description="Calls a worker process has in flight per model of this backend; default "
        "WORKER_MAX_CALLS_PER_BACKEND.",
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        normalize_origin(value)  # raises naming what is wrong
        parts = urlsplit(value.strip())
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return value.strip().rstrip("/")


@dataclass(frozen=True, slots=True)
class Backend:
    """A configured backend, resolved: where to call it and how."""

    name: str
    protocol: Protocol
    origin: str  # scheme://host:port, what allow-lists and connection pools compare
    base_path: str  # "" or "/prefix" (no trailing slash), put before the protocol's paths
    token: SecretStr | None = field(default=None, repr=False)
    connect_timeout: float = 2.0
    read_timeout: float = 60.0
    max_calls: int | None = None

    @property
    def operations(self) -> tuple[str, ...]:
        return OPERATIONS[self.protocol]

    @property
    def default_operation(self) -> str:
        return OPERATIONS[self.protocol][0]

    @classmethod
    def from_config(cls, name: str, config: BackendConfig) -> Backend:
        path = urlsplit(config.url).path.rstrip("/")
        if config.protocol is Protocol.openai and path.endswith("/v1"):
            path = path[: -len("/v1")]  # the OpenAI SDK's base URL: its paths start after /v1
        return cls(
            name=name,
            protocol=config.protocol,
            origin=normalize_origin(config.url),
            base_path=path,
            token=config.token,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_calls=config.max_calls,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: its backend, the origin to call, and the operation."""

    backend: str
    protocol: Protocol
    origin: str
    operation: str


def default_target(backend: Backend) -> Target:
    return Target(backend.name, backend.protocol, backend.origin, backend.default_operation)
