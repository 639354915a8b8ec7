"""`/docs` renders with no network but localhost, and stays usable when API keys are set.

A real headless Chromium (Debian's `chromium`) loads Swagger UI from the API; its resolver maps
every host but 127.0.0.1 to nothing, so a page that needs a CDN renders blank and fails here.
`UPDATE_DOCS_SCREENSHOT=1` also writes docs/swagger-offline.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.main import create_app
from devstack import RedisServer
from devstack.services import ApiServer
from shared.settings import Settings
from tests.support.paths import REPO as REPO_ROOT
from tests.support.stack import require_tool

REPO = REPO_ROOT
SCREENSHOT = REPO / "docs" / "swagger-offline.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "docs-test-key-5f2c"
OPERATIONS = ("/dispatch_model", "/tasks/{task_id}", "/health", "/ready")


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    argv = [
        CHROMIUM,
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
        # No network but this machine: any other host name resolves to nothing.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=10000",
        *extra,
        url,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.e2e
def test_swagger_ui_renders_offline_with_api_keys_set(tmp_path: Path) -> None:
    require_tool(
        CHROMIUM is not None,
        "no `chromium` binary: apt-get install chromium (scripts/bootstrap.sh)",
    )
    with RedisServer(tmp_path / "redis") as redis:
        env = {"REDIS_URL": redis.url, "DISPATCHER_API_KEYS": KEY}
        with ApiServer(env, tmp_path / "api.log") as api:
            rendered = chromium(f"{api.url}/docs", tmp_path / "profile-dom", "--dump-dom")
            if os.environ.get("UPDATE_DOCS_SCREENSHOT"):
                shot = chromium(
                    f"{api.url}/docs",
                    tmp_path / "profile-shot",
                    f"--screenshot={SCREENSHOT}",
                    "--window-size=1280,1100",
                    "--hide-scrollbars",
                )
                assert shot.returncode == 0, shot.stderr[-2000:]
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    dom = rendered.stdout
    # Swagger UI ran: the operations it builds from /openapi.json, and the Authorize button.
    assert 'class="swagger-ui' in dom
    for path in OPERATIONS:
        assert f'data-path="{path}"' in dom, f"{path} not rendered"
    assert re.search(r'<button[^>]*class="[^"]*\bauthorize\b[^"]*"', dom), "no Authorize button"
    assert "Authorize" in dom


def served(config: Settings, *paths: str) -> dict[str, httpx.Response]:
    async def run() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(config))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return {path: await client.get(path) for path in paths}

    return asyncio.run(run())


DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


def test_docs_are_public_with_api_keys_and_load_nothing_remote() -> None:
    responses = served(Settings(_env_file=None, dispatcher_api_keys=KEY), *DOC_PATHS)
    for path, response in responses.items():
        assert response.status_code == 200, (path, response.text)
    for page in ("/docs", "/redoc"):
        html = responses[page].text
        remote = re.findall(r'(?:src|href)="(https?:)?//', html)
        assert not remote, f"{page} loads from another host: {remote}"
        assets = re.findall(r'(?:src|href)="(/docs/static/[^"]+)"', html)
        assert assets, f"{page} references no local assets"
        for asset, answer in served(Settings(_env_file=None), *assets).items():
            assert answer.status_code == 200, asset
            assert len(answer.content) > 1000 or asset.endswith(".png"), asset


def test_openapi_declares_both_key_schemes() -> None:
    spec: dict[str, Any] = served(
        Settings(_env_file=None, dispatcher_api_keys=KEY), "/openapi.json"
    )["/openapi.json"].json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"]["in"] == "header"
    assert schemes["apiKeyHeader"]["name"] == "X-API-Key"
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            if path == "/health":
                assert operation["security"] == []
            else:
                assert operation["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    # Without keys the schemes stay declared, and no credentials is one of the alternatives.
    open_spec = served(Settings(_env_file=None), "/openapi.json")["/openapi.json"].json()
    assert open_spec["paths"]["/dispatch_model"]["post"]["security"][0] == {}


def test_docs_public_false_hides_them() -> None:
    responses = served(Settings(_env_file=None, docs_public=False), *DOC_PATHS)
    assert {path: r.status_code for path, r in responses.items()} == dict.fromkeys(DOC_PATHS, 404)
