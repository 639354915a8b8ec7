"""How big each scenario is: the full run, and the smoke run that keeps the harness from rotting."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Plan:
    """Counts, durations and the stack's shape; every load loop is bounded by these."""

    smoke: bool
    # (1) latency: sequential requests per side, after a few unmeasured warm-up requests.
    latency_requests: int
    latency_warmup: int
    # (2, 3) wrk throughput: connections and seconds per side.
    connections: int
    wrk_seconds: float
    # (4) burst on the slow model: requests fired at once.
    burst_requests: int
    # (5) waiting clients on the slow model, opened over `waiting_ramp_seconds`.
    waiting_clients: int
    waiting_ramp_seconds: float
    # (6) horizontal scale: seconds per worker count; fixed concurrency per worker.
    scale_seconds: float
    scale_worker_counts: tuple[int, ...]
    scale_concurrency: int
    scale_torchserve_workers: int
    # (7) async submit rate: seconds of wrk.
    submit_seconds: float
    # (8) mixed load: seconds of sync wrk on the tiny model, alone and while a batch of
    # `mixed_batch_items` runs on the slow model.
    mixed_seconds: float
    mixed_batch_items: int
    # (9) several API processes: uvicorn processes, and waiting clients through them.
    api_processes: int
    api_processes_waiting: int
    # (10) a CPU-bound model (~10 ms of CPU a request, 2 TorchServe workers): wrk connections;
    # seconds per side are `wrk_seconds`.
    cpu_model_connections: int
    # (11) long calls through ONE worker process: how many at once, how long each takes at the
    # stand-in model server, and how long the scenario may wait for all of them.
    long_calls: int
    long_call_seconds: float
    long_calls_budget: float
    # (12) an OIP backend (MLServer, one process): wrk connections per side; seconds per side
    # are `wrk_seconds`, sequential requests `latency_requests`.
    oip_connections: int
    # (13) streamed outputs: SSE clients at once on one API process, each on its own task that
    # streams `streams_chunks` pieces `streams_delay` s apart, opened over `streams_ramp` s;
    # every client gives up after `streams_budget` s. A TorchServe of its own serves the
    # streaming model on `streams_torchserve_workers` workers batching up to
    # `streams_batch_size` requests (waiting `streams_batch_delay_ms` to fill a batch); the
    # tasks run on `streams_worker_processes` Celery workers that each hold every stream at once.
    streams_clients: int
    streams_chunks: int
    streams_delay: float
    streams_ramp: float
    streams_budget: float
    streams_torchserve_workers: int
    streams_batch_size: int
    streams_batch_delay_ms: int
    streams_worker_processes: int
    # The dispatcher's Celery workers for the tiny-model and burst scenarios (and the peer's).
    workers: int
    concurrency: int
    pool: str
    # TorchServe workers of the slow model for bursts and waiting clients.
    slow_workers: int
    # Processes that fire raw HTTP requests for the burst and waiting scenarios.
    client_processes: int
    profile: bool = False

    def with_options(
        self,
        *,
        profile: bool,
        workers: int | None = None,
        concurrency: int | None = None,
        pool: str | None = None,
    ) -> Plan:
        """This plan with the command line's choices (None keeps the plan's value)."""
        return replace(
            self,
            profile=profile,
            workers=self.workers if workers is None else workers,
            concurrency=self.concurrency if concurrency is None else concurrency,
            pool=self.pool if pool is None else pool,
        )


FULL = Plan(
    smoke=False,
    latency_requests=1_000,
    latency_warmup=50,
    connections=64,
    wrk_seconds=10.0,
    burst_requests=2_000,
    waiting_clients=5_000,
    waiting_ramp_seconds=2.0,
    scale_seconds=10.0,
    scale_worker_counts=(1, 2, 4),
    scale_concurrency=1,
    scale_torchserve_workers=8,
    submit_seconds=10.0,
    mixed_seconds=10.0,
    mixed_batch_items=10_000,
    api_processes=2,
    api_processes_waiting=2_000,
    cpu_model_connections=8,
    long_calls=1_000,
    long_call_seconds=5.0,
    long_calls_budget=90.0,
    # As many as the dispatcher's workers call one model with at once (2 workers x
    # WORKER_MAX_CALLS_PER_BACKEND 8): more only queue, in Redis or in MLServer's one process.
    oip_connections=16,
    streams_clients=1_000,
    streams_chunks=10,
    streams_delay=0.5,
    streams_ramp=1.0,
    streams_budget=90.0,
    # 8 x 250: twice the clients, so batches that close unfilled (after the delay) while the
    # tasks reach TorchServe over a second or two still hold every stream at once.
    streams_torchserve_workers=8,
    streams_batch_size=250,
    streams_batch_delay_ms=250,
    streams_worker_processes=2,
    workers=2,
    concurrency=8,
    pool="threads",
    slow_workers=2,
    client_processes=2,
)

SMOKE = replace(
    FULL,
    smoke=True,
    latency_requests=60,
    latency_warmup=10,
    wrk_seconds=1.0,
    burst_requests=150,
    waiting_clients=200,
    waiting_ramp_seconds=0.2,
    scale_seconds=1.0,
    submit_seconds=1.0,
    mixed_seconds=1.0,
    mixed_batch_items=300,
    api_processes_waiting=100,
    long_calls=40,
    long_call_seconds=0.5,
    long_calls_budget=20.0,
    streams_clients=40,
    streams_chunks=5,
    streams_delay=0.1,
    streams_ramp=0.2,
    streams_budget=30.0,
    streams_torchserve_workers=2,
    streams_batch_size=40,
    streams_batch_delay_ms=100,
)
