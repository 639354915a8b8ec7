"""Sessions and CSRF tokens (api/console/auth.py): what a forged, tampered, expired or revoked
cookie gets, and which roles keys map to."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import ValidationError

from api.auth import key_owner
from api.console.auth import (
    CsrfRejected,
    NotOperator,
    Role,
    check_csrf,
    csrf_token,
    new_session,
    operator_of_headers,
    read_session,
    role_of_key,
)
from shared.errors import Unauthorized
from shared.settings import Settings
from tests.unit.api.console.harness import OPERATOR, TENANT_A, TENANT_B

KEYED = Settings(
    _env_file=None,
    dispatcher_api_keys=f"{TENANT_A},{TENANT_B}",
    operator_api_keys=OPERATOR,
)
OPEN = Settings(_env_file=None)


def test_keys_map_to_roles_and_owner_names_never_the_key() -> None:
    assert role_of_key(KEYED, OPERATOR) == (Role.operator, key_owner(OPERATOR))
    assert role_of_key(KEYED, TENANT_B) == (Role.tenant, key_owner(TENANT_B))
    with pytest.raises(Unauthorized):
        role_of_key(KEYED, "not-a-key-of-ours")
    _, cookie = new_session(KEYED, Role.operator, key_owner(OPERATOR))
    assert OPERATOR not in cookie
    assert OPERATOR not in base64.urlsafe_b64decode(cookie.split(".")[0]).decode()


def test_a_session_reads_back_and_a_tampered_one_does_not() -> None:
    viewer, cookie = new_session(KEYED, Role.tenant, key_owner(TENANT_A))
    assert read_session(KEYED, cookie) == viewer
    payload, signature = cookie.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload))
    forged = base64.urlsafe_b64encode(json.dumps({**body, "r": "operator"}).encode()).decode()
    assert read_session(KEYED, f"{forged}.{signature}") is None
    assert read_session(KEYED, payload) is None
    assert read_session(KEYED, f"{payload}.{'0' * 64}") is None
    assert read_session(KEYED, None) is None


def test_expired_and_revoked_sessions_end() -> None:
    viewer, cookie = new_session(KEYED, Role.operator, key_owner(OPERATOR), now=1_000.0)
    assert read_session(KEYED, cookie, now=1_001.0) == viewer
    assert read_session(KEYED, cookie, now=viewer.expires + 1) is None
    # The key removed from the settings: the signing secret changes with the keys.
    fewer = Settings(_env_file=None, dispatcher_api_keys=TENANT_A, operator_api_keys=OPERATOR)
    _, tenant_b = new_session(KEYED, Role.tenant, key_owner(TENANT_B))
    assert read_session(fewer, tenant_b) is None
    # A session made without keys (open) is no session once keys are configured.
    _, open_cookie = new_session(OPEN, Role.operator, "")
    assert read_session(KEYED, open_cookie) is None


def test_csrf_token_is_bound_to_its_session() -> None:
    mine, _ = new_session(KEYED, Role.operator, key_owner(OPERATOR))
    other, _ = new_session(KEYED, Role.operator, key_owner(OPERATOR))
    check_csrf(KEYED, mine, csrf_token(KEYED, mine))
    for token in (csrf_token(KEYED, other), "", None):
        with pytest.raises(CsrfRejected) as refused:
            check_csrf(KEYED, mine, token)
        assert refused.value.status == 403
    with pytest.raises(CsrfRejected):
        check_csrf(KEYED, None, csrf_token(KEYED, mine))


def test_status_needs_an_operator_key_when_keys_are_configured() -> None:
    assert operator_of_headers(OPEN, None, None) == ""
    assert operator_of_headers(KEYED, f"Bearer {OPERATOR}", None) == key_owner(OPERATOR)
    assert operator_of_headers(KEYED, None, OPERATOR) == key_owner(OPERATOR)
    with pytest.raises(Unauthorized):
        operator_of_headers(KEYED, None, None)
    with pytest.raises(NotOperator) as tenant:
        operator_of_headers(KEYED, None, TENANT_A)
    assert (tenant.value.status, tenant.value.code) == (403, "operator_key_required")


def test_operator_keys_are_validated() -> None:
    with pytest.raises(ValidationError, match="16"):
        Settings(_env_file=None, operator_api_keys="short")
    with pytest.raises(ValidationError, match="both"):
        Settings(_env_file=None, dispatcher_api_keys=OPERATOR, operator_api_keys=OPERATOR)
