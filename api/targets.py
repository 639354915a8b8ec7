"""Which TorchServe a request goes to: the default, or an allow-listed one it names."""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.errors import InvalidRequest, TargetNotAllowed
from shared.models import PredictionRequest
from shared.settings import Settings, normalize_origin


def resolve_origin(request: PredictionRequest, settings: Settings) -> str:
    """The `scheme://host:port` to call; 403 unless it is on the allow-list.

    Fields the request leaves out come from TORCHSERVE_URL, as the original proxy's defaults did.
    """
    if request.host is None and request.port is None and request.http_protocol is None:
        return settings.default_origin  # the common case: nothing to parse
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
