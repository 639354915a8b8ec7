"""The console's unit tests run the real app (ASGI) on a real redis-server; tasks are submitted
through the API and moved on by the workers' own scripts (task_start, task_finish), as a
worker would, so the records are exactly what the console reads in production."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from api.main import create_app
from shared.errors import DispatchError, ModelNotFound, TaskExpired
from shared.redis_state.keys import task_key
from shared.redis_state.record import Outcome
from shared.redis_state.task_scripts import FinishTasks, StartTasks, StartTerms
from shared.settings import Settings

TENANT_A, TENANT_B = "console-tenant-key-a", "console-tenant-key-b"
OPERATOR = "console-operator-key-0123456789"
TERMS = StartTerms(3, 600, "w1@host", TaskExpired("x").body().model_dump_json(), "{}")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Console:
    app: FastAPI
    http: httpx.AsyncClient

    async def submit(self, key: str | None = None, **body: Any) -> str:
        headers = {"Prefer": "respond-async", **({"X-API-Key": key} if key else {})}
        answer = await self.http.post(
            "/dispatch_model", json={"model_name": "echo", "input": {}, **body}, headers=headers
        )
        assert answer.status_code == 202, answer.text
        task_id: str = answer.json()["task_id"]
        return task_id

    async def run(self, task_id: str, error: DispatchError | None = None) -> None:
        """A worker's start and end of the task: succeeded, or failed with `error`."""
        redis = self.app.state.store.redis
        [(verdict, _)] = await StartTasks(redis)([task_id], TERMS, time.time())
        assert verdict == "run", verdict
        outcome = (
            Outcome.succeeded(task_id, {"ok": True})
            if error is None
            else Outcome.failed(task_id, error)
        )
        assert await FinishTasks(redis)([outcome], now=time.time(), ttl=600) == [True]

    async def fail(self, task_id: str) -> None:
        # What RETRY_KEEP_SECONDS writes at submit (api/retry.py), set here as its own unit
        # tests do, so the ending keeps the request for a retry whatever the submit path writes.
        await self.app.state.store.redis.hset(task_key(task_id), "retry_keep", "600")
        await self.run(task_id, ModelNotFound("no model nope"))

    async def csrf(self, path: str = "/console/tasks") -> str:
        page = await self.http.get(path)
        found = CSRF.search(page.text)
        assert found, page.text[:500]
        return found.group(1)

    async def sign_in(self, key: str) -> httpx.Response:
        token = await self.csrf("/console/signin")
        return await self.http.post(
            "/console/signin", data={"csrf": token, "key": key, "next": "/console"}
        )


@asynccontextmanager
async def console(config: Settings) -> AsyncIterator[Console]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield Console(app, http)


def settings(redis_url: str, keyed: bool, **overrides: Any) -> Settings:
    keys: dict[str, Any] = {}
    if keyed:
        keys = {"dispatcher_api_keys": f"{TENANT_A},{TENANT_B}", "operator_api_keys": OPERATOR}
    return Settings(
        _env_file=None,
        redis_url=redis_url,
        torchserve_url="http://127.0.0.1:9",
        **keys,
        **overrides,
    )
