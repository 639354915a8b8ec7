"""A real dispatcher (API, a Celery worker, a private redis-server) before real model servers.

The dispatch tests (test_dispatch_*.py) send a request through it and compare the answer with
the same request sent to the server directly (test_servers_direct.py's helpers). Each test module
starts one stack, with BACKENDS naming the servers it needs and one of them as DEFAULT_BACKEND,
so `/ready` is about those servers. TORCHSERVE_URL points at a port nothing listens on: these
tests need no TorchServe, and starting the session's would cost half a minute per run. The stack
runs on a redis-server of its own, as `stack_factory`'s do: no other module's workers can take
its messages.

`BackendStackLogs` (registered by the conftest) adds the end of the stack's logs to a failed
test's report, as fixtures.py does for the model servers' logs.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import RedisServer, Stack, free_port, start_stack
from tests.support.servers.running import RunningServer

# Long-polls and sync waits: a llama.cpp completion on 2 busy cores takes a few seconds.
WAIT_SECONDS = 60
LOG_TAIL_LINES = 80
# The key of the conftest's `llama_keyed_server`. Not a secret: a test looks for it in the logs.
LLAMA_API_KEY = "llama-key-3f9c1d7e"


@dataclass
class BackendStack:
    """The running stack and an HTTP client on its API."""

    stack: Stack
    http: httpx.Client
    backends: dict[str, dict[str, Any]]

    def dispatch(
        self,
        body: Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        wait: int = WAIT_SECONDS,
    ) -> httpx.Response:
        """POST /dispatch_model with a JSON body, waiting up to `wait` s (0: respond-async)."""
        prefer = "respond-async" if wait == 0 else f"wait={wait}"
        return self.http.post(
            "/dispatch_model", json=dict(body), headers={"Prefer": prefer, **(headers or {})}
        )

    def succeeded(self, response: httpx.Response) -> dict[str, Any]:
        """The body of a 200 that succeeded; an AssertionError with the body otherwise."""
        assert response.status_code == 200, f"{response.status_code}: {response.text}"
        body: dict[str, Any] = response.json()
        assert body["status"] == "succeeded", body
        return body

    def task(self, task_id: str, wait: int = WAIT_SECONDS) -> dict[str, Any]:
        """GET /tasks/{id}, long-polling until it ended (or `wait` s passed)."""
        response = self.http.get(f"/tasks/{task_id}", params={"wait": wait})
        assert response.status_code == 200, f"{response.status_code}: {response.text}"
        view: dict[str, Any] = response.json()
        return view

    def batch(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """POST /batches, long-poll it to its end, and its results (JSONL) in input order."""
        created = self.http.post("/batches", json={"requests": [dict(r) for r in requests]})
        assert created.status_code == 202, f"{created.status_code}: {created.text}"
        batch_id = created.json()["batch_id"]
        ended = self.http.get(f"/batches/{batch_id}", params={"wait": WAIT_SECONDS}).json()
        assert ended["status"] == "completed", ended
        results = self.http.get(f"/batches/{batch_id}/results")
        assert results.status_code == 200, results.text
        return [json.loads(line) for line in results.text.splitlines() if line.strip()]

    def backend_list(self) -> dict[str, dict[str, Any]]:
        """GET /backends, by name."""
        response = self.http.get("/backends")
        assert response.status_code == 200, response.text
        return {info["name"]: info for info in response.json()["backends"]}

    def logs(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of each of the stack's logs."""
        return "\n".join(
            f"===== {path} =====\n" + "\n".join(path.read_text().splitlines()[-lines:])
            for path in self.stack.log_paths
            if path.exists()
        )


def backend(server: RunningServer, protocol: str, **extra: Any) -> dict[str, Any]:
    """A BACKENDS entry for `server` (extra: token, read_timeout, max_calls...)."""
    return {"url": server.url, "protocol": protocol, **extra}


@contextmanager
def backend_stack(
    root: Path,
    backends: Mapping[str, Mapping[str, Any]],
    *,
    default: str,
    env: Mapping[str, str] | None = None,
) -> Iterator[BackendStack]:
    """A private redis-server, one worker and the API with `backends` as BACKENDS and
    `default` as DEFAULT_BACKEND (and the only gate of /ready); all stopped by PID on exit."""
    configured = {name: dict(entry) for name, entry in backends.items()}
    settings = {
        "BACKENDS": json.dumps(configured),
        "DEFAULT_BACKEND": default,
        # Nothing listens there: a request that named no backend would not reach a TorchServe.
        "TORCHSERVE_URL": f"http://127.0.0.1:{free_port()}",
        "WORKER_METRICS_PORT": "0",
        **(env or {}),
    }
    with ExitStack() as cleanup:
        redis = cleanup.enter_context(RedisServer(root / "redis"))
        stack = start_stack(
            {**settings, "REDIS_URL": redis.url}, root / "stack", workers=1, webhook_consumers=0
        )
        cleanup.callback(stack.stop)
        http = cleanup.enter_context(
            httpx.Client(base_url=stack.api_url, timeout=WAIT_SECONDS + 30, trust_env=False)
        )
        yield BackendStack(stack, http, configured)


class BackendStackLogs:
    """A plugin: a failed test that used a BackendStack gets the end of its logs."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed:
            for value in getattr(item, "funcargs", {}).values():
                if isinstance(value, BackendStack):
                    report.sections.append(("dispatcher logs (ends)", value.logs()))
        return report
