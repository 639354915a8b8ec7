"""`GET /backends` and `/ready`'s backends, against real (stub) model servers on 127.0.0.1
(tests/support/backend_stub.py) and, for `/ready`, a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from api.backend_probe import CHECK_TIMEOUT
from api.main import create_app
from devstack import RedisServer
from devstack.processes import free_port
from shared.redis_state.keys import WORKERS_KEY
from shared.settings import Settings
from tests.support.backend_stub import BackendStub, oip_stub, openai_stub

KEY = "backends-test-key-1"


@asynccontextmanager
async def api(config: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


def settings(backends: dict[str, Any], redis_url: str | None = None, **overrides: Any) -> Settings:
    return Settings(
        _env_file=None,
        redis_url=redis_url or f"redis://127.0.0.1:{free_port()}/0",
        torchserve_url=overrides.pop("torchserve_url", f"http://127.0.0.1:{free_port()}"),
        backends=json.dumps(backends),
        **overrides,
    )


def get(config: Settings, path: str, **kwargs: Any) -> httpx.Response:
    async def run() -> httpx.Response:
        async with api(config) as client:
            return await client.get(path, **kwargs)

    return asyncio.run(run())


def test_backends_lists_each_with_health_operations_and_models() -> None:
    kserve = oip_stub(extensions=["model_repository_extension"], name="kserve", models=["iris"])
    mlserver = oip_stub(extensions=[], name="mlserver")
    mlserver.routes[("POST", "/v2/repository/index")] = (
        200,
        [{"name": "iris-sk", "version": "1", "state": "READY", "reason": ""}],
    )
    llm = openai_stub(["qwen", "qwen"])
    with kserve, mlserver, llm, BackendStub({("GET", "/ping"): (200, {})}) as torchserve:
        config = settings(
            {
                "ks": {"url": kserve.url, "protocol": "oip", "token": "TOKEN-ks-1"},
                "mls": {"url": mlserver.url, "protocol": "oip"},
                "llm": {"url": llm.url + "/v1", "protocol": "openai", "token": "TOKEN-llm-2"},
                "gone": {"url": f"http://127.0.0.1:{free_port()}", "protocol": "openai"},
            },
            torchserve_url=torchserve.url,
            ready_backends="torchserve,mls",
        )
        response = get(config, "/backends")
        assert response.status_code == 200, response.text
        assert "TOKEN" not in response.text
        found = {b["name"]: b for b in response.json()["backends"]}
        assert list(found) == ["torchserve", "ks", "mls", "llm", "gone"]
        assert found["torchserve"] == {
            "name": "torchserve",
            "protocol": "torchserve",
            "origin": torchserve.url,
            "default": True,
            "gates_readiness": True,
            "operations": ["predictions", "explanations"],
            "health": "ok",
            "takes_bytes": True,
            "models": None,
            "models_error": "TorchServe's inference API does not list models",
        }
        assert (found["ks"]["models"], found["ks"]["takes_bytes"]) == (["iris"], True)
        assert (found["mls"]["models"], found["mls"]["takes_bytes"]) == (["iris-sk"], False)
        assert found["mls"]["gates_readiness"]
        assert not found["ks"]["gates_readiness"]
        assert (found["llm"]["models"], found["llm"]["takes_bytes"]) == (["qwen"], False)
        assert found["llm"]["health"] == "ok"
        assert found["gone"]["health"].startswith("unreachable at http://127.0.0.1:")
        assert found["gone"]["models"] is None
        assert "unreachable" in found["gone"]["models_error"]
        # Each backend's token, as Bearer, on every question it was asked.
        assert {s.headers.get("Authorization") for s in kserve.seen} == {"Bearer TOKEN-ks-1"}
        assert {s.headers.get("Authorization") for s in llm.seen} == {"Bearer TOKEN-llm-2"}
        assert all("Authorization" not in s.headers for s in mlserver.seen)
        # MLServer has no GET /v2/models: the repository index answered.
        listings = [(s.method, s.path) for s in mlserver.seen if "/v2/" in s.path]
        assert ("GET", "/v2/models") in listings
        assert ("POST", "/v2/repository/index") in listings


def test_backends_needs_a_key_like_the_other_routes() -> None:
    config = settings({}, dispatcher_api_keys=KEY)
    assert get(config, "/backends").status_code == 401
    assert get(config, "/backends", headers={"X-API-Key": KEY}).status_code == 200


def test_backends_is_documented_with_its_response_model() -> None:
    document = create_app(settings({})).openapi()
    operation = document["paths"]["/backends"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/Backends"}
    info = document["components"]["schemas"]["BackendInfo"]["properties"]
    assert {"name", "protocol", "origin", "health", "default", "models"} <= set(info)
    assert "token" not in info
    assert operation["security"]  # a key, like every route but /health


def test_a_backend_that_hangs_costs_one_timeout_and_all_are_asked_at_once() -> None:
    slow = [BackendStub({("GET", "/v1/models"): (200, {"data": []})}, delay=CHECK_TIMEOUT + 1)
            for _ in range(3)]  # fmt: skip
    for stub in slow:
        stub.start()
    try:
        config = settings(
            {f"s{i}": {"url": s.url, "protocol": "openai"} for i, s in enumerate(slow)}
        )
        started = time.monotonic()
        response = get(config, "/backends")
        elapsed = time.monotonic() - started
    finally:
        for stub in slow:
            stub.stop()
    healths = [b["health"] for b in response.json()["backends"] if b["name"].startswith("s")]
    assert len(healths) == 3
    assert all(h.endswith("(ReadTimeout)") for h in healths), healths
    assert elapsed < 2 * CHECK_TIMEOUT + 1.5  # health and models: one timeout each, not six


@pytest.fixture
def redis_url(dedicated_redis: RedisServer, clean_env: None) -> str:
    client = dedicated_redis.client()
    client.zadd(WORKERS_KEY, {"w1@host": time.time() + 3600})  # a live worker
    return dedicated_redis.url


def ready(config: Settings) -> tuple[int, dict[str, Any]]:
    response = get(config, "/ready")
    return response.status_code, response.json()


def test_ready_reports_every_backend_and_only_the_default_gates_it(redis_url: str) -> None:
    with BackendStub({("GET", "/ping"): (200, {})}) as torchserve, oip_stub(extensions=[]) as oip:
        down = f"http://127.0.0.1:{free_port()}"
        backends = {
            "mls": {"url": oip.url, "protocol": "oip"},
            "llm": {"url": down, "protocol": "openai"},
        }
        status, body = ready(settings(backends, redis_url, torchserve_url=torchserve.url))
        assert (status, body["ready"]) == (200, True), body
        assert body["checks"] == {"redis": "ok", "workers": "ok", "torchserve": "ok"}
        assert body["backends"]["mls"] == {
            "protocol": "oip",
            "health": "ok",
            "gates_readiness": False,
        }
        llm = body["backends"]["llm"]
        assert llm["health"] == f"unreachable at {down} (ConnectError)"
        assert not llm["gates_readiness"]

        # The one that is down gates it: 503 naming it.
        gated = settings(backends, redis_url, torchserve_url=torchserve.url, ready_backends="llm")
        status, body = ready(gated)
        assert (status, body["ready"]) == (503, False)
        assert body["checks"] == {"redis": "ok", "workers": "ok", "llm": llm["health"]}

        # A default that answers something else than 200: named with its URL and status.
        oip.routes[("GET", "/v2/health/ready")] = (503, {"ready": False})
        status, body = ready(settings(backends, redis_url, default_backend="mls"))
        assert status == 503
        assert body["checks"]["mls"] == f"{oip.url}/v2/health/ready answered 503"


def test_ready_asks_afresh_and_a_backend_named_like_a_check_keeps_both(redis_url: str) -> None:
    with BackendStub({("GET", "/ping"): (200, {})}) as torchserve:
        config = settings(
            {"redis": {"url": torchserve.url, "protocol": "torchserve"}},
            redis_url,
            torchserve_url=torchserve.url,
            ready_backends="torchserve,redis",
        )

        async def twice() -> list[dict[str, Any]]:
            async with api(config) as client:
                first = (await client.get("/ready")).json()
                torchserve.routes[("GET", "/ping")] = (500, {})
                return [first, (await client.get("/ready")).json()]

        first, second = asyncio.run(twice())
    assert first["checks"] == {
        "redis": "ok",
        "workers": "ok",
        "torchserve": "ok",
        "backend:redis": "ok",
    }
    assert second["checks"]["torchserve"] == f"{torchserve.url}/ping answered 500"
    assert not second["ready"]
