"""API keys: when DISPATCHER_API_KEYS is set, a key is needed and tasks belong to their key."""

from __future__ import annotations

import hashlib
import hmac

from shared.errors import Unauthorized
from shared.settings import Settings


def key_owner(key: str) -> str:
    """A stable, non-secret name for a key, stored as a task's owner (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return None


def authenticate(settings: Settings, authorization: str | None, x_api_key: str | None) -> str:
    """The caller's owner name: "" with auth off; 401 when a key is needed and not valid."""
    if not settings.dispatcher_api_keys:
        return ""
    key = presented_key(authorization, x_api_key)
    if key is None:
        raise Unauthorized(
            "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key`"
        )
    # Compare against every key, in constant time each, so timing reveals neither key nor index.
    matched = False
    for allowed in settings.dispatcher_api_keys:
        matched |= hmac.compare_digest(key.encode(), allowed.get_secret_value().encode())
    if not matched:
        raise Unauthorized("the API key is not valid")
    return key_owner(key)
