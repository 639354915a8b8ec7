"""The benchmark's own stack: Redis, TorchServe (echo + slow20), the API, Celery workers, the peer.

Everything binds 127.0.0.1 on free ports, lives under one run directory and is stopped by PID
(devstack's ManagedProcess) when the ExitStack closes, whatever happened before.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Self

import httpx
import redis

from bench.progress import say
from devstack import (
    PAYLOAD_MODULE,
    ApiServer,
    CeleryWorker,
    RedisServer,
    Stack,
    StopsOnExit,
    TorchServe,
    archive_demo_model,
    archive_model,
)
from devstack.upstream import DELAY_ENV as UPSTREAM_DELAY_ENV

TINY_MODEL = "echo"
SLOW_MODEL = "slow20"
SLOW_HANDLER = Path(__file__).parent / "models" / "slow20.py"
CPU_MODEL = "cpu10"
CPU_HANDLER = Path(__file__).parent / "models" / "cpu10.py"
STREAM_MODEL = "batchstream"
STREAM_HANDLER = Path(__file__).parent / "models" / "batchstream.py"
# TorchServe's queue per model; the burst scenario is about what happens beyond it.
JOB_QUEUE_SIZE = 100
PEER_API_APP = "bench.peer.app:create_app"
PEER_WORKER_APP = "bench.peer.worker"


class BenchStack(StopsOnExit):
    """Starts the shared servers once; worker sets and the peer come and go per scenario."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._exit = ExitStack()
        self.redis = RedisServer(root / "redis", appendonly=False)
        self.torchserve = TorchServe(
            root / "torchserve",
            root / "model-store",
            [f"{TINY_MODEL}.mar", f"{SLOW_MODEL}.mar"],
            job_queue_size=JOB_QUEUE_SIZE,
        )
        self.api: ApiServer | None = None
        self._worker_serial = 0

    # --- shared servers -------------------------------------------------------------------

    def start(self, slow_workers: int) -> Self:
        store = self.root / "model-store"
        archive_demo_model(TINY_MODEL, store)
        archive_model(SLOW_MODEL, SLOW_HANDLER, store, extra_files=[PAYLOAD_MODULE])
        archive_model(CPU_MODEL, CPU_HANDLER, store, extra_files=[PAYLOAD_MODULE])
        say(f"starting redis-server and TorchServe ({TINY_MODEL}, {SLOW_MODEL}) ...")
        self._exit.callback(self.redis.stop)
        self.redis.start()
        self._exit.callback(self.torchserve.stop)
        self.torchserve.start()
        self.scale_slow(slow_workers)
        self.api = ApiServer(self.env(api=True), self.root / "logs" / "api.log")
        self._exit.callback(self.api.stop)
        self.api.start()
        say(f"stack up: API {self.api.url}, TorchServe {self.torchserve.inference_url}")
        return self

    def env(self, *, api: bool = False) -> dict[str, str]:
        env = {"REDIS_URL": self.redis.url, "TORCHSERVE_URL": self.torchserve.inference_url}
        if api:
            # The submit-rate scenario queues tens of thousands of tasks with no worker running:
            # the 429 guard must not be what it measures.
            env["MAX_QUEUE_DEPTH"] = "10000000"
        return env

    @property
    def api_server(self) -> ApiServer:
        if self.api is None:
            raise RuntimeError("the stack has not been started")
        return self.api

    def scale_slow(self, workers: int) -> None:
        self.torchserve.scale(SLOW_MODEL, workers)

    def predictions_url(self, model: str) -> str:
        return f"{self.torchserve.inference_url}/predictions/{model}"

    def dispatch_url(self) -> str:
        return f"{self.api_server.url}/dispatch_model"

    def client(self) -> redis.Redis:
        return self.redis.client(decode_responses=True)

    # --- Celery workers -------------------------------------------------------------------

    def start_workers(
        self, count: int, concurrency: int, pool: str, env: dict[str, str] | None = None
    ) -> list[CeleryWorker]:
        """`count` dispatcher workers, started in parallel; stopped by stop_workers or at exit.

        `env` overrides the stack's (e.g. TORCHSERVE_URL for another model server)."""
        workers = []
        for _ in range(count):
            self._worker_serial += 1
            name = f"bench{self._worker_serial}"
            log = self.root / "logs" / f"worker-{self._worker_serial}.log"
            worker = CeleryWorker({**self.env(), **(env or {})}, name, log, concurrency, pool)
            self._exit.callback(worker.stop)
            workers.append(worker.launch())
        for worker in workers:
            worker.wait_ready(60)
        return workers

    def start_interactive_worker(self, concurrency: int) -> CeleryWorker:
        """A worker reserved for the interactive class, as make run and the deployments add one."""
        self._worker_serial += 1
        name, log = f"bench{self._worker_serial}", self.root / "logs" / "worker-interactive.log"
        worker = CeleryWorker.interactive(self.env(), name, log, concurrency)
        self._exit.callback(worker.stop)
        return worker.start(60)

    @staticmethod
    def stop_workers(workers: list[CeleryWorker]) -> None:
        for worker in workers:
            worker.stop()

    def drop_queue(self, queue: str = "dispatch") -> int:
        """Delete the messages still in `queue` (after the submit rate, a canceled batch).

        Returns how many messages there were. Their tasks stay `queued` unless canceled before.
        """
        with self.client() as client:
            depth = int(client.llen(queue))
            client.delete(queue)
        return depth

    # --- more API processes ---------------------------------------------------------------

    def start_api(
        self, processes: int, env: dict[str, str] | None = None, name: str = ""
    ) -> ApiServer:
        """Another API (uvicorn --workers `processes`) on the same Redis, ready once every
        process is; stopped by the caller or at exit. `env` overrides the stack's."""
        log = self.root / "logs" / f"api-{name or f'{processes}-processes'}.log"
        api = ApiServer({**self.env(api=True), **(env or {})}, log, workers=processes)
        self._exit.callback(api.stop)
        return api.start(60)

    # --- a stand-in model server ------------------------------------------------------------

    def start_upstream(self, delay: float) -> ApiServer:
        """devstack/upstream.py under uvicorn: every prediction waits `delay` s; stopped at exit."""
        log = self.root / "logs" / "upstream.log"
        env = {UPSTREAM_DELAY_ENV: str(delay)}
        upstream = ApiServer(env, log, app="devstack.upstream:create_app")
        self._exit.callback(upstream.stop)
        return upstream.start(30)

    # --- a TorchServe of its own for the streaming model ------------------------------------

    def start_stream_torchserve(
        self, workers: int, batch_size: int, batch_delay_ms: int, queue: int
    ) -> TorchServe:
        """A second TorchServe serving only STREAM_MODEL, batched (`batch_size` requests per
        batch, waiting at most `batch_delay_ms` to fill one) on `workers` workers, with a job
        queue of `queue`: the shared one's queue (JOB_QUEUE_SIZE) is what the burst scenario
        is about, and a thousand streams at once would overflow it. Stopped at exit."""
        store = self.root / "model-store-streams"
        archive_model(STREAM_MODEL, STREAM_HANDLER, store, extra_files=[PAYLOAD_MODULE])
        server = TorchServe(self.root / "torchserve-streams", store, [], job_queue_size=queue)
        self._exit.callback(server.stop)
        server.start()
        params: dict[str, str | int] = {
            "url": f"{STREAM_MODEL}.mar",
            "batch_size": batch_size,
            "max_batch_delay": batch_delay_ms,
            "initial_workers": workers,
            "synchronous": "true",
        }
        # devstack's TorchServe.register takes no batch settings: the management API directly.
        url = f"{server.management_url}/models"
        response = httpx.post(url, params=params, timeout=120, trust_env=False)
        if response.status_code != 200:
            raise RuntimeError(f"registering {STREAM_MODEL} failed: {response.text}")
        return server

    # --- the common-pattern peer ----------------------------------------------------------

    def start_peer(self, workers: int, concurrency: int, pool: str) -> Peer:
        peer = Peer(self.root / "peer", self.torchserve.inference_url, workers, concurrency, pool)
        self._exit.push(peer)
        return peer.start()

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        self._exit.close()


class Peer(StopsOnExit):
    """The peer's own redis-server (so its result subscriptions are counted apart), API, workers."""

    def __init__(
        self, root: Path, torchserve_url: str, workers: int, concurrency: int, pool: str
    ) -> None:
        self.redis = RedisServer(root / "redis", appendonly=False)
        env = {"REDIS_URL": self.redis.url, "TORCHSERVE_URL": torchserve_url}
        api = ApiServer(env, root / "api.log", app=PEER_API_APP)
        peer_workers = [
            CeleryWorker(
                env, f"peer{i}", root / f"worker-{i}.log", concurrency, pool, app=PEER_WORKER_APP
            )
            for i in range(1, workers + 1)
        ]
        self.services = Stack(env, api, peer_workers)

    @property
    def dispatch_url(self) -> str:
        return f"{self.services.api_url}/dispatch_model"

    def start(self) -> Self:
        try:
            self.redis.start()
            self.services.start(60)
        except BaseException:
            self.stop()
            raise
        return self

    def channels(self) -> int:
        """Pub/sub channels left on the peer's Redis (Celery's per-task result channels)."""
        with self.redis.client() as client:
            return len(client.pubsub_channels())

    def stop(self) -> None:
        self.services.stop()
        self.redis.stop()
