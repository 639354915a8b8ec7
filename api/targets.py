"""Which model server a request goes to: its backend, the operation, and for TorchServe the
default origin or an allow-listed one the original proxy's `host`/`port`/`http_protocol` name."""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.backends import TORCHSERVE, Protocol, Target, default_target
from shared.errors import InvalidRequest, TargetNotAllowed, UnknownBackend, UnsupportedOperation
from shared.models import PredictionRequest
from shared.settings import Settings, normalize_origin


def resolve_target(request: PredictionRequest, settings: Settings) -> Target:
    """The backend, origin and operation to call; 422 for an unknown backend or operation,
    403 for a TorchServe target off the allow-list."""
    # `is None`, not falsiness: an empty `backend=` in a form is a name no backend has.
    name = settings.default_backend if request.backend is None else request.backend
    backend = settings.backend_map.get(name)
    if backend is None:
        raise UnknownBackend(
            f"backend: {name[:64]!r} is not configured; configured: "
            f"{', '.join(sorted(settings.backend_map))}"
        )
    operation = backend.default_operation if request.operation is None else request.operation
    if operation not in backend.operations:
        raise UnsupportedOperation(
            f"operation: {operation[:64]!r} is not an operation of backend {name!r} "
            f"({backend.protocol.value}); use one of: {', '.join(backend.operations)}"
        )
    if backend.protocol is not Protocol.torchserve:
        _refuse_torchserve_fields(request, name, backend.protocol)
    targeted = request.host is not None or request.port is not None
    if not targeted and request.http_protocol is None:
        if operation == backend.default_operation:
            return default_target(backend)  # the common case: nothing to build
        return Target(name, backend.protocol, backend.origin, operation)
    if name != TORCHSERVE:
        raise InvalidRequest(
            f"host/port/http_protocol pick a TorchServe of the {TORCHSERVE!r} backend; leave "
            f"them out with backend {name!r} (its URL is configured in BACKENDS)"
        )
    return Target(TORCHSERVE, Protocol.torchserve, resolve_origin(request, settings), operation)


# A request's own credentials are TorchServe's (the original proxy sent them on): any other
# backend's come from BACKENDS alone, so a request naming some would be silently ignored.
CREDENTIAL_FIELDS = ("token", "username", "password")


def _refuse_torchserve_fields(request: PredictionRequest, name: str, protocol: Protocol) -> None:
    given = [field for field in CREDENTIAL_FIELDS if getattr(request, field) is not None]
    if given:
        raise InvalidRequest(
            f"{'/'.join(given)}: a request's credentials go to TorchServe backends only; leave "
            f"them out with backend {name!r} (its token is configured in BACKENDS)"
        )
    if protocol is Protocol.openai and request.model_version is not None:
        raise InvalidRequest(
            f"model_version: backend {name!r} (openai) has no model versions; name the model "
            "in model_name alone"
        )


def resolve_origin(request: PredictionRequest, settings: Settings) -> str:
    """The TorchServe `scheme://host:port` to call; 403 unless it is on the allow-list.

    Fields the request leaves out come from TORCHSERVE_URL, as the original proxy's defaults did.
    """
    default = urlsplit(settings.torchserve_url)
    scheme = request.http_protocol or default.scheme
    host = request.host or default.hostname or ""
    port = request.port or default.port or (443 if scheme == "https" else 80)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    try:
        origin = normalize_origin(f"{scheme}://{host}:{port}")
    except ValueError as error:  # e.g. "[0]": bracketed, but no IPv6 address
        raise InvalidRequest(f"host: {request.host!r} is not a host name or IP address") from error
    if origin not in settings.allowed_origins:
        raise TargetNotAllowed(
            f"{origin} is not an allowed TorchServe target; leave host/port/http_protocol out to "
            "use the default, or ask the operator to add it to TORCHSERVE_ALLOWED_TARGETS"
        )
    return origin
