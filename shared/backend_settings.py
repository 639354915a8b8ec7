"""The settings that name the model servers: TorchServe's own and the backends of BACKENDS.

A base of `Settings` (shared/settings.py), which every process reads; here so that the model
servers' knobs and their checks sit together.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from shared.backends import (
    TORCHSERVE,
    Backend,
    BackendConfig,
    Protocol,
    decode_backends,
    normalize_origin,
)


class BackendSettings(BaseSettings):
    """TORCHSERVE_*, BACKENDS, DEFAULT_BACKEND and READY_BACKENDS."""

    torchserve_url: str = Field(
        "http://127.0.0.1:8080",
        description="Default TorchServe inference endpoint (`http(s)://host:port`, no credentials "
        "in it); always allowed.",
    )
    torchserve_allowed_targets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Other TorchServe origins (`http://host:port`) a request may pick with "
        "`host`/`port`/`http_protocol`; any other is a 403.",
    )
    torchserve_token: SecretStr | None = Field(
        None, description="Inference token sent when the request carries no `token` (empty: none)."
    )
    torchserve_connect_timeout: float = Field(
        2.0, gt=0, description="TorchServe connect timeout per attempt (s)."
    )
    torchserve_read_timeout: float = Field(
        60.0, gt=0, description="TorchServe read timeout per attempt (s)."
    )

    backends: Annotated[dict[str, BackendConfig], NoDecode] = Field(
        default_factory=dict,
        description="More model servers, a JSON object of named backends: "
        '`{"mls": {"url": "http://host:9100", "protocol": "oip"}}`; protocols `torchserve`, '
        "`oip`, `openai`; per backend optional `token`, `connect_timeout`, `read_timeout`, "
        "`max_calls` (docs/backends.md). `torchserve` is always TORCHSERVE_URL.",
    )
    default_backend: str = Field(
        TORCHSERVE, description="The backend a request that names none goes to."
    )
    ready_backends: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Backends whose health gates `/ready` (comma-separated); empty: only "
        "DEFAULT_BACKEND. The others are reported, and their tasks wait or fail by deadline.",
    )

    @field_validator("torchserve_allowed_targets", "ready_backends", mode="before")
    @classmethod
    def _comma_separated_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("torchserve_url")
    @classmethod
    def _valid_torchserve_url(cls, value: str) -> str:
        normalize_origin(value)
        return value.rstrip("/")

    @field_validator("torchserve_allowed_targets")
    @classmethod
    def _valid_targets(cls, value: list[str]) -> list[str]:
        return [normalize_origin(item) for item in value]

    @field_validator("backends", mode="before")
    @classmethod
    def _backends_json(cls, value: object) -> object:
        return decode_backends(value)

    @model_validator(mode="after")
    def _backends_exist(self) -> Self:
        for name in (self.default_backend, *self.ready_backends):
            if name not in self.backend_map:
                raise ValueError(
                    f"backend {name!r} (DEFAULT_BACKEND or READY_BACKENDS) is not configured; "
                    f"configured: {', '.join(sorted(self.backend_map))}"
                )
        return self

    @property
    def default_origin(self) -> str:
        return normalize_origin(self.torchserve_url)

    @property
    def allowed_origins(self) -> frozenset[str]:
        return frozenset([self.default_origin, *self.torchserve_allowed_targets])

    @cached_property
    def backend_map(self) -> dict[str, Backend]:
        """Every backend by name: `torchserve` (TORCHSERVE_URL) and those of BACKENDS."""
        torchserve = Backend(
            name=TORCHSERVE,
            protocol=Protocol.torchserve,
            origin=self.default_origin,
            base_path="",
            token=self.torchserve_token,
            connect_timeout=self.torchserve_connect_timeout,
            read_timeout=self.torchserve_read_timeout,
        )
        configured = {name: Backend.from_config(name, c) for name, c in self.backends.items()}
        return {TORCHSERVE: torchserve, **configured}
