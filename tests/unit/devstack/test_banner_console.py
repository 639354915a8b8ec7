"""`make run`'s banner names the operator console next to the API (issue 20)."""

from __future__ import annotations

from devstack.local import _banner


def test_the_banner_names_the_console_url() -> None:
    banner = _banner("http://127.0.0.1:8000", [], [])
    assert "The dispatcher is up at http://127.0.0.1:8000 " in banner
    assert "The operator console:  http://127.0.0.1:8000/console " in banner
