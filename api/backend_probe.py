"""What the API asks the configured backends themselves: health, models, binary tensor support.

Three questions, each a small GET (or POST) with a short timeout, answered from a cache so that
concurrent askers share one request per backend (single flight) and a backend that hangs costs
at most CHECK_TIMEOUT:

- health, for `/ready` (always asked afresh, joined if already in flight) and `GET /backends`
  (up to HEALTH_TTL old): TorchServe `GET /ping`, OIP `GET /v2/health/ready`, OpenAI
  `GET /v1/models`;
- the models a backend reports, for `GET /backends` (MODELS_TTL): OIP `GET /v2/models`
  (KServe), else `POST /v2/repository/index` (MLServer, Triton); OpenAI `GET /v1/models`;
  TorchServe's inference API lists none;
- whether an OIP server takes bytes (the binary tensor data extension), for requests that send
  bytes (METADATA_TTL): its server metadata, `GET /v2`, announces `binary_tensor_data` in
  `extensions` (Triton does). KServe's ModelServer reads the extension's
  `Inference-Header-Content-Length` but announces only `model_repository_extension`
  (kserve/protocol/dataplane.py), so a server named `kserve` counts as taking it. MLServer
  announces none and reads none. A server whose metadata cannot be read is given the benefit of
  the doubt (`None`): the request is queued and the worker's call fails as that server answers,
  rather than refusing work for a server that is only briefly away.

JSON requests never wait for any of this: only a request with bytes for an OIP backend reads
the metadata, from the cache when it is fresh. Requests carry the backend's token as Bearer
where one is configured; the token is never in a result, a log line or an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from shared.backends import Backend, Protocol, Target
from shared.errors import UnsupportedOperation

T = TypeVar("T")
CHECK_TIMEOUT = 2.0
HEALTH_TTL = 5.0
MODELS_TTL = 10.0
METADATA_TTL = 30.0
# A metadata probe that failed is retried this soon: the server may be back.
FAILED_METADATA_TTL = 5.0
MAX_MODELS = 1000
BINARY_EXTENSION = "binary_tensor_data"
# OIP servers that read the extension without announcing it (see the module's doc).
READS_BINARY_UNANNOUNCED = frozenset({"kserve"})


@dataclass(frozen=True, slots=True)
class Metadata:
    """An OIP server's metadata (`GET /v2`), or that it could not be read (`reachable` False)."""

    reachable: bool
    name: str | None = None
    extensions: frozenset[str] = frozenset()

    @property
    def takes_bytes(self) -> bool | None:
        """True/False as the server says; None when it could not be asked."""
        if not self.reachable:
            return None
        return BINARY_EXTENSION in self.extensions or self.name in READS_BINARY_UNANNOUNCED


@dataclass(frozen=True, slots=True)
class Models:
    """The models a backend reports; `names` None where it cannot list them (`why`)."""

    names: tuple[str, ...] | None
    why: str | None = None


def base_url(backend: Backend) -> str:
    return backend.origin + backend.base_path


def _headers(backend: Backend) -> dict[str, str]:
    if backend.token is None:
        return {}
    return {"Authorization": f"Bearer {backend.token.get_secret_value()}"}


def _failure(url: str, error: Exception) -> str:
    """Why a probe failed, naming the URL (never credentials: URLs carry none, by the settings)."""
    return f"unreachable at {url} ({type(error).__name__})"


class BackendProbe:
    """The API process's one view of its backends (api/main.py keeps it in `app.state.probe`)."""

    def __init__(self, http: httpx.AsyncClient, backends: Mapping[str, Backend]) -> None:
        self._http = http
        self.backends = backends
        # (question, backend) -> (when fetched, whether it succeeded, the answer)
        self._cache: dict[tuple[str, str], tuple[float, bool, Any]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[Any]] = {}

    # --- the three questions ----------------------------------------------------------------

    async def health(self, backend: Backend, max_age: float = 0.0) -> str:
        """ "ok", or why not (naming the URL that failed); at most `max_age` seconds old."""
        return await self._cached("health", backend, self._health, max_age, max_age)

    async def models(self, backend: Backend) -> Models:
        return await self._cached("models", backend, self._models, MODELS_TTL, MODELS_TTL)

    async def metadata(self, backend: Backend) -> Metadata:
        return await self._cached(
            "metadata", backend, self._metadata, METADATA_TTL, FAILED_METADATA_TTL
        )

    async def require_bytes(self, target: Target) -> None:
        """422 when the target's OIP server says it cannot take bytes (api/backend_inputs.py);
        passes when it does, or when it could not be asked (see the module's doc)."""
        backend = self.backends[target.backend]
        if backend.protocol is not Protocol.oip:
            return
        if (await self.metadata(backend)).takes_bytes is False:
            raise UnsupportedOperation(
                f"data: backend {backend.name!r} (oip) cannot take bytes: its server does not "
                f"announce the binary tensor data extension ({BINARY_EXTENSION} in the "
                'extensions of GET /v2); send the tensor as JSON input, {"inputs": [{"name": '
                '"x", "shape": [1], "datatype": "BYTES", "data": ["..."]}]}'
            )

    async def healths(self, max_age: float = 0.0) -> dict[str, str]:
        """Every backend's health, asked concurrently."""
        names = list(self.backends)
        found = await asyncio.gather(*(self.health(self.backends[n], max_age) for n in names))
        return dict(zip(names, found, strict=True))

    # --- the cache: one request in flight per question and backend ----------------------------

    async def _cached(
        self,
        kind: str,
        backend: Backend,
        fetch: Callable[[Backend], Awaitable[T]],
        max_age: float,
        failed_max_age: float,
    ) -> T:
        """The answer if one is young enough for this asker, else the one in flight, else a new
        request's. Ages are the asker's: `/ready` (0) never takes what `/backends` (5 s) kept."""
        key = (kind, backend.name)
        held = self._cache.get(key)
        if held is not None:
            fetched_at, ok, result = held
            if time.monotonic() - fetched_at < (max_age if ok else failed_max_age):
                kept: T = result
                return kept
        flight = self._inflight.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._refresh(key, backend, fetch))
            self._inflight[key] = flight
        # Shielded: one asker that gives up (a client that went away) cancels no other's answer.
        answer: T = await asyncio.shield(flight)
        return answer

    async def _refresh(
        self, key: tuple[str, str], backend: Backend, fetch: Callable[[Backend], Awaitable[T]]
    ) -> T:
        try:
            result = await fetch(backend)
            ok = (
                result == "ok"
                or getattr(result, "reachable", False)
                or (isinstance(result, Models) and result.names is not None)
            )
            self._cache[key] = (time.monotonic(), ok, result)
            return result
        finally:
            self._inflight.pop(key, None)

    # --- the requests -------------------------------------------------------------------------

    async def _get(self, backend: Backend, path: str, method: str = "GET") -> httpx.Response:
        return await self._http.request(
            method,
            base_url(backend) + path,
            headers=_headers(backend),
            json={} if method == "POST" else None,
            timeout=CHECK_TIMEOUT,
        )

    async def _health(self, backend: Backend) -> str:
        path = {
            Protocol.torchserve: "/ping",
            Protocol.oip: "/v2/health/ready",
            Protocol.openai: "/v1/models",
        }[backend.protocol]
        url = base_url(backend) + path
        try:
            response = await self._get(backend, path)
        except httpx.HTTPError as error:
            return _failure(base_url(backend), error)
        if response.status_code != 200:
            return f"{url} answered {response.status_code}"
        return "ok"

    async def _models(self, backend: Backend) -> Models:
        if backend.protocol is Protocol.torchserve:
            return Models(None, "TorchServe's inference API does not list models")
        if backend.protocol is Protocol.openai:
            return await self._listing(backend, "/v1/models", "GET", _openai_models)
        kserve = await self._listing(backend, "/v2/models", "GET", _kserve_models)
        if kserve.names is not None:
            return kserve
        index = await self._listing(backend, "/v2/repository/index", "POST", _repository_index)
        return index if index.names is not None else kserve

    async def _listing(
        self,
        backend: Backend,
        path: str,
        method: str,
        parse: Callable[[Any], list[str] | None],
    ) -> Models:
        url = base_url(backend) + path
        try:
            response = await self._get(backend, path, method)
            names = parse(response.json()) if response.status_code == 200 else None
        except httpx.HTTPError as error:
            return Models(None, _failure(base_url(backend), error))
        except ValueError:  # not JSON
            names = None
        if names is None:
            return Models(None, f"{method} {url} answered {response.status_code} without a list")
        return Models(tuple(dict.fromkeys(names))[:MAX_MODELS])

    async def _metadata(self, backend: Backend) -> Metadata:
        try:
            response = await self._get(backend, "/v2")
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return Metadata(reachable=False)
        if not isinstance(body, dict):
            return Metadata(reachable=False)
        listed = body.get("extensions")
        name = body.get("name")
        extensions = listed if isinstance(listed, list) else []
        return Metadata(
            reachable=True,
            name=name if isinstance(name, str) else None,
            extensions=frozenset(e for e in extensions if isinstance(e, str)),
        )


def _kserve_models(body: Any) -> list[str] | None:
    """KServe's `{"models": ["a", ...]}`."""
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list):
        return None
    return [m for m in models if isinstance(m, str)]


def _repository_index(body: Any) -> list[str] | None:
    """MLServer's and Triton's `[{"name": "a", "version": ..., "state": ...}, ...]`."""
    if not isinstance(body, list):
        return None
    return [m["name"] for m in body if isinstance(m, dict) and isinstance(m.get("name"), str)]


def _openai_models(body: Any) -> list[str] | None:
    """`{"object": "list", "data": [{"id": "a", ...}, ...]}`."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
