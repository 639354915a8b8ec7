"""Who is looking at the console: operator, tenant or nobody yet, from a signed session cookie.

A browser cannot send `Authorization` on a link or a form, so the console signs a key in once
(POST /console/signin) and keeps a session cookie: HttpOnly (no script reads it), SameSite=
Strict (no other site's page sends it, so a forged form arrives without it), Path=/console,
Secure over https. The cookie holds the role, the key's owner name (api/auth.py key_owner, a
hash: never the key) and a random nonce, signed with HMAC-SHA256. The signing secret is derived
from the configured keys, so every API process accepts every other's sessions and changing the
keys ends them; a session whose key was removed stops working at its next request, because the
owner name is looked up among the keys configured now.

Every POST of the console carries a CSRF token: HMAC(secret, nonce), bound to the session
(`csrf_token`). A page on another site can neither read the nonce nor get the cookie sent.

Without any key configured (make run) every visitor is an operator, as the API is open then;
visitors still get an (anonymous) session, so the CSRF check is the same in both modes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from enum import Enum

from api.auth import key_owner, presented_key
from shared.errors import DispatchError, Unauthorized
from shared.settings import Settings

COOKIE = "dispatcher_console"
COOKIE_PATH = "/console"
SESSION_SECONDS = 12 * 3600


class NotOperator(DispatchError):
    """A tenant key where an operator key (OPERATOR_API_KEYS) is needed."""

    status = 403
    code = "operator_key_required"


class CsrfRejected(DispatchError):
    """A console POST without the session's CSRF token."""

    status = 403
    code = "csrf_rejected"


class Role(str, Enum):
    operator = "operator"  # every task, the global figures
    tenant = "tenant"  # its own tasks and batches only
    anonymous = "anonymous"  # not signed in (keys configured): the sign-in form only


@dataclass(frozen=True, slots=True)
class Viewer:
    """The console's visitor. `owner`: the tasks it may see ("" for an operator: all)."""

    role: Role
    owner: str
    nonce: str
    expires: float

    @property
    def operator(self) -> bool:
        return self.role is Role.operator

    @property
    def signed_in(self) -> bool:
        return self.role is not Role.anonymous

    def sees(self, task_owner: str) -> bool:
        return self.operator or (self.role is Role.tenant and task_owner == self.owner)


def keyed(settings: Settings) -> bool:
    """Whether the console needs a key: any key configured, tenant or operator."""
    return bool(settings.dispatcher_api_keys or settings.operator_api_keys)


def _secret(settings: Settings) -> bytes:
    keys = [
        k.get_secret_value() for k in (*settings.operator_api_keys, *settings.dispatcher_api_keys)
    ]
    material = "\0".join(["model-dispatcher console session v1", *sorted(keys)])
    return hashlib.sha256(material.encode()).digest()


def _owners(settings: Settings) -> tuple[set[str], set[str]]:
    """The owner names of the operator keys and of the tenant keys configured now."""
    operators = {key_owner(k.get_secret_value()) for k in settings.operator_api_keys}
    tenants = {key_owner(k.get_secret_value()) for k in settings.dispatcher_api_keys}
    return operators, tenants


def role_of_key(settings: Settings, key: str) -> tuple[Role, str]:
    """The role and owner name of a presented key; Unauthorized when it is none of ours.

    Every configured key is compared in constant time, so timing tells neither key nor role.
    """
    found: Role | None = None
    for role, keys in (
        (Role.operator, settings.operator_api_keys),
        (Role.tenant, settings.dispatcher_api_keys),
    ):
        for allowed in keys:
            if hmac.compare_digest(key.encode(), allowed.get_secret_value().encode()):
                found = found or role
    if found is None:
        raise Unauthorized("the API key is not valid")
    return found, key_owner(key)


def _sign(settings: Settings, payload: bytes) -> str:
    return hmac.new(_secret(settings), payload, hashlib.sha256).hexdigest()


def new_session(
    settings: Settings, role: Role, owner: str, now: float | None = None
) -> tuple[Viewer, str]:
    """A fresh viewer (new nonce: a sign-in never keeps the session it came with) and its cookie."""
    expires = float(int((time.time() if now is None else now) + SESSION_SECONDS))
    viewer = Viewer(role, owner, secrets.token_urlsafe(18), expires)
    body = json.dumps({"r": role.value, "o": owner, "n": viewer.nonce, "e": int(expires)})
    payload = base64.urlsafe_b64encode(body.encode())
    return viewer, f"{payload.decode()}.{_sign(settings, payload)}"


def read_session(settings: Settings, cookie: str | None, now: float | None = None) -> Viewer | None:
    """The viewer a cookie names, or None: unsigned, tampered, expired, or its key removed."""
    if not cookie or "." not in cookie:
        return None
    payload, _, signature = cookie.rpartition(".")
    if not hmac.compare_digest(signature, _sign(settings, payload.encode())):
        return None
    try:
        fields = json.loads(base64.urlsafe_b64decode(payload.encode()))
        role, owner, nonce, expires = (
            Role(fields["r"]),
            str(fields["o"]),
            str(fields["n"]),
            float(fields["e"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
    if expires < (time.time() if now is None else now):
        return None
    operators, tenants = _owners(settings)
    if role is Role.operator and keyed(settings) and owner not in operators:
        return None
    if role is Role.tenant and owner not in tenants:
        return None
    if role is Role.operator and not keyed(settings) and owner:
        return None
    return Viewer(role, owner, nonce, expires)


def anonymous_role(settings: Settings) -> Role:
    """What a visitor without a session is: an operator when no key is configured."""
    return Role.anonymous if keyed(settings) else Role.operator


def csrf_token(settings: Settings, viewer: Viewer) -> str:
    """The token every form of this session carries."""
    return _sign(settings, f"csrf\0{viewer.nonce}".encode())


def check_csrf(settings: Settings, viewer: Viewer | None, token: str | None) -> None:
    """403 unless `token` is this session's CSRF token."""
    if viewer is None or not token or not hmac.compare_digest(token, csrf_token(settings, viewer)):
        raise CsrfRejected(
            "the form's CSRF token is missing or not this session's: reload the console page "
            "and submit the form again (forms from other sites are refused)"
        )


def operator_of_headers(
    settings: Settings, authorization: str | None, x_api_key: str | None
) -> str:
    """`GET /status`'s check: the operator's owner name ("" with no key configured);
    401 without a valid key, 403 for a tenant key."""
    if not keyed(settings):
        return ""
    key = presented_key(authorization, x_api_key)
    if key is None:
        raise Unauthorized(
            "an operator key is required: send `Authorization: Bearer <key>` or `X-API-Key` "
            "with one of OPERATOR_API_KEYS"
        )
    role, owner = role_of_key(settings, key)
    if role is not Role.operator:
        raise NotOperator("this is a tenant key: the global figures need one of OPERATOR_API_KEYS")
    return owner
