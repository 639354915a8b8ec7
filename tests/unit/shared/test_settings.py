"""Settings validate themselves, and docs/configuration.md documents every one of them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import Settings, normalize_origin
from tests.support.paths import REPO as REPO_ROOT

CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"


def build(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_defaults_are_consistent() -> None:
    settings = build()
    assert settings.default_origin == "http://127.0.0.1:8080"
    assert settings.task_time_limit > settings.dispatch_max_timeout
    # Leases are renewed every heartbeat: the timeout outlasts missed heartbeats, not tasks.
    assert settings.visibility_timeout >= 3 * settings.worker_heartbeat_interval


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHSERVE_ALLOWED_TARGETS", "http://a:1, https://B:2/")
    monkeypatch.setenv("DISPATCHER_API_KEYS", "k1,k2")
    monkeypatch.setenv("DISPATCH_DEFAULT_WAIT", "5")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.allowed_origins == {"http://127.0.0.1:8080", "http://a:1", "https://b:2"}
    assert [key.get_secret_value() for key in settings.dispatcher_api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings)
    assert settings.dispatch_default_wait == 5


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"dispatch_default_wait": 10, "dispatch_max_wait": 5}, "DISPATCH_DEFAULT_WAIT"),
        ({"dispatch_default_timeout": 100, "dispatch_max_timeout": 50}, "DISPATCH_DEFAULT_TIMEOUT"),
        (
            {"worker_heartbeat_interval": 5, "broker_visibility_timeout": 10},
            "BROKER_VISIBILITY_TIMEOUT",
        ),
        ({"retry_backoff_initial": 9, "retry_backoff_max": 1}, "RETRY_BACKOFF_INITIAL"),
        ({"torchserve_url": "ftp://x"}, "http(s)"),
        ({"torchserve_url": "http://user:pw@x"}, "credentials"),
        ({"torchserve_allowed_targets": "not a url"}, "http(s)"),
    ],
)
def test_inconsistent_settings_are_refused(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        build(**values)


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://Host", "http://host:80"),
        ("https://host/", "https://host:443"),
        ("http://127.0.0.1:8080/predictions", "http://127.0.0.1:8080"),
        ("http://[::1]:81", "http://[::1]:81"),
    ],
)
def test_origins_are_normalized(url: str, origin: str) -> None:
    assert normalize_origin(url) == origin


def test_the_configuration_page_documents_every_setting() -> None:
    page = CONFIGURATION.read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in page]
    assert missing == []


def test_every_setting_has_a_description() -> None:
    """The generated page and .env.example take each setting's meaning from here alone."""
    undescribed = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undescribed == []
