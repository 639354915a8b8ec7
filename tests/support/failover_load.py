"""A bounded load on the API during a Redis fault, and the check of every answer it got.

`FailoverLoad` submits at a fixed rate (~100/s) from one asyncio loop in a thread of its own,
so the test's thread is free to inject the fault: a rotating mix of sync (the default wait) and
async (`Prefer: respond-async`) POST /dispatch_model to `echo` (its answer is its input, so each
result can be checked exactly) and `counting` (every call logged: duplicate executions are
counted from the model's own log), plus a POST /batches of echo items every second. Every answer
is kept: status, error code, task ids, each task's expected result, when it was sent and answered.

`verify` then polls every accepted task (200/202) on the current primary until terminal, within
a bound, and returns the figures of the fault table: lost (accepted, not `succeeded` with its own
result), 200s carrying a wrong result, the 503s and other refusals, the time from the fault to
the first accepted submit sent after it, duplicate executions, sync waiters answered more than
LATE_SECONDS after their task finished (they needed the re-read), and how long each worker took
to finish something again after the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import httpx
import redis

from shared.redis_state.batch import item_task_id
from shared.redis_state.record import TERMINAL
from tests.support.faults import model_calls

Kind = Literal["sync", "async", "batch"]
# A sync answer this long after its task's finished_at did not come from the finish announcement.
LATE_SECONDS = 3.0
# A worker that finished nothing for this long after the fault "needed more than 10 s to resume".
RESUME_LIMIT = 10.0
COUNTING = "counting"
# One request in ten of each rotation (by submit number) is of each kind below; the rest echo.
_ROTATION: tuple[tuple[Kind, str], ...] = (
    ("sync", "echo"), ("async", "echo"), ("sync", "echo"), ("async", "echo"), ("sync", "echo"),
    ("async", "echo"), ("sync", COUNTING), ("async", "echo"), ("sync", "echo"), ("async", COUNTING),
)  # fmt: skip
ReadRecords = Callable[[list[str]], dict[str, dict[str, str]]]


@dataclass(frozen=True, slots=True)
class Expected:
    """What one task must end with: echo answers its input; counting answers {"count": int}."""

    model: str
    input: dict[str, Any]

    def matches(self, value: object) -> bool:
        if self.model == COUNTING:
            return isinstance(value, dict) and isinstance(value.get("count"), int)
        return value == self.input


@dataclass(slots=True)
class Answer:
    """One request and what it got (`status` 0: no HTTP answer at all)."""

    kind: Kind
    sent_at: float  # epoch seconds, comparable with the records' timestamps
    answered_at: float = 0.0
    status: int = 0
    code: str | None = None
    tasks: dict[str, Expected] = field(default_factory=dict)
    right_result: bool | None = None  # a sync 200: did it carry its task's expected result

    @property
    def accepted(self) -> bool:
        return self.status in (200, 202)


class FailoverLoad:
    """`rate` submits/s to `api_url` from start() until stop(); ids start with `run`."""

    def __init__(
        self,
        api_url: str,
        run: str,
        *,
        rate: float = 100.0,
        batch_every: float = 1.0,
        batch_size: int = 10,
        timeout: float = 40.0,
    ) -> None:
        self.api_url = api_url
        self.run = run
        self.rate = rate
        self.batch_every = batch_every
        self.batch_size = batch_size
        self.timeout = timeout
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, name="failover-load")
        self._error: BaseException | None = None

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> list[Answer]:
        """Stop submitting, wait for every answer still due (each bounded by `timeout`)."""
        self._stop.set()
        self._thread.join(self.timeout + 15)
        if self._thread.is_alive():
            raise AssertionError(f"the load's requests did not end within {self.timeout + 15}s")
        if self._error is not None:
            raise self._error
        return self.answers

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # handed to stop()
            self._error = error

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=4000, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=self.api_url, timeout=self.timeout, limits=limits
        ) as http:
            pending: set[asyncio.Task[None]] = set()
            started = time.monotonic()
            n = 0
            next_batch = started + self.batch_every / 2
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_batch:
                    next_batch += self.batch_every
                    request = self._batch(http, n)
                else:
                    request = self._dispatch(http, n)
                n += 1
                job = asyncio.create_task(request)
                pending.add(job)
                job.add_done_callback(pending.discard)
                await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))
            if pending:
                await asyncio.gather(*pending)

    async def _dispatch(self, http: httpx.AsyncClient, n: int) -> None:
        kind, model = _ROTATION[n % len(_ROTATION)]
        body = {"id": f"{self.run}-{n}", "n": n}
        answer = Answer(kind, time.time())
        self.answers.append(answer)
        headers = {"Prefer": "respond-async"} if kind == "async" else {}
        try:
            response = await http.post(
                "/dispatch_model", json={"model_name": model, "input": body}, headers=headers
            )
        except httpx.HTTPError:
            answer.answered_at = time.time()
            return
        answer.answered_at = time.time()
        answer.status = response.status_code
        data = _json(response)
        task_id = data.get("task_id")
        if isinstance(task_id, str):
            answer.tasks[task_id] = Expected(model, body)
        if not answer.accepted:
            answer.code = str(data.get("code"))
        elif answer.status == 200:
            answer.right_result = data.get("status") == "succeeded" and Expected(
                model, body
            ).matches(data.get("prediction_value"))

    async def _batch(self, http: httpx.AsyncClient, n: int) -> None:
        inputs = [{"id": f"{self.run}-{n}.{i}", "n": n, "i": i} for i in range(self.batch_size)]
        requests = [
            {"custom_id": str(i), "model_name": "echo", "input": body}
            for i, body in enumerate(inputs)
        ]
        answer = Answer("batch", time.time())
        self.answers.append(answer)
        try:
            response = await http.post("/batches", json={"requests": requests})
        except httpx.HTTPError:
            answer.answered_at = time.time()
            return
        answer.answered_at = time.time()
        answer.status = response.status_code
        data = _json(response)
        batch_id = data.get("batch_id")
        if answer.accepted and isinstance(batch_id, str):
            for i, body in enumerate(inputs):
                answer.tasks[item_task_id(batch_id, i)] = Expected("echo", body)
        elif not answer.accepted:
            answer.code = str(data.get("code"))


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class Figures:
    """One row of the fault table (`line()` prints it, `append_to()` keeps it as JSON)."""

    fault: str
    submits: int
    rate: float
    accepted: int
    tasks: int
    lost: int
    wrong_200: int
    refused_503: int
    other_refusals: dict[str, int]
    no_answer: int
    first_accept_s: float | None
    last_503_s: float | None
    delivered_twice: int
    called_twice: int  # accepted `counting` tasks the model received more than once
    refused_ran: int  # `counting` submits answered 503 (or not at all) that reached the model
    reconciled: int  # pushed again by worker/reconciler.py (its message was lost)
    late_waiters: int
    latest_answer_s: float  # the longest a sync answer came after its task's finished_at
    sync_202: int
    resume_s: float | None
    slow_workers: int
    stalled_workers: int
    lost_ids: list[str] = field(default_factory=list)
    wrong_ids: list[str] = field(default_factory=list)
    twice_ids: list[str] = field(default_factory=list)  # counting calls > 1: the task's record
    notes: dict[str, float] = field(default_factory=dict)  # the fault's own timings

    def line(self) -> str:
        shown = {
            k: v for k, v in asdict(self).items() if k not in ("lost_ids", "wrong_ids", "twice_ids")
        }
        return "FAILOVER " + " ".join(
            f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in shown.items()
        )

    def append_to(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        row = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(self)}
        with path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


def wait_records(read: ReadRecords, ids: Iterable[str], bound: float) -> dict[str, dict[str, str]]:
    """Each task's record once all are terminal, or as they are when `bound` runs out (a read
    that fails, as on a primary in the middle of a switch, is tried again)."""
    wanted = list(ids)
    seen: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + bound
    while True:
        open_ = [t for t in wanted if seen.get(t, {}).get("status") not in TERMINAL]
        if not open_ or time.monotonic() > deadline:
            return seen
        with contextlib.suppress(redis.RedisError, OSError):  # mid-switch: read again
            seen.update(read(open_))
        time.sleep(0.2)


def verify(
    fault: str,
    answers: list[Answer],
    read: ReadRecords,
    fault_at: float,
    counting_log: Path,
    run: str,
    *,
    bound: float = 45.0,
    killed_workers: Iterable[str] = (),
) -> Figures:
    """The fault table's row for one run: every accepted task polled until terminal (`bound`)."""
    accepted = [a for a in answers if a.accepted]
    expected = {task: exp for a in accepted for task, exp in a.tasks.items()}
    final = wait_records(read, expected, bound)
    lost = sorted(
        task
        for task, exp in expected.items()
        if final.get(task, {}).get("status") != "succeeded" or not exp.matches(_result(final[task]))
    )
    kinds = {task: a.kind for a in accepted for task in a.tasks}
    lost_detail = [
        _describe(task, kinds[task], final.get(task, {}), fault_at) for task in lost[:10]
    ]
    wrong = sorted(t for a in accepted if a.right_result is False for t in a.tasks)
    statuses = Counter(a.status for a in answers if not a.accepted)
    refusals = Counter(f"{a.status}:{a.code}" for a in answers if a.status not in (0, 200, 202))
    after = [a for a in answers if a.sent_at >= fault_at]
    first = min((a.answered_at - fault_at for a in after if a.accepted), default=None)
    refused_times = [a.answered_at - fault_at for a in after if a.status == 503]
    calls = model_calls(counting_log, run)
    by_input = {str(exp.input["id"]): task for task, exp in expected.items()}
    twice = [
        f"{by_input.get(key, key)} calls={count} "
        f"deliveries={final.get(by_input.get(key, ''), {}).get('deliveries', '?')}"
        for key, count in calls.items()
        if count > 1 and key in by_input
    ]
    # Submits refused 503 whose write reached the old primary anyway and ran there: a client
    # must retry those with an Idempotency-Key, or they run twice.
    refused_ran = sum(1 for key in calls if key not in by_input)
    late, sync_202, latest = 0, 0, 0.0
    for a in accepted:
        if a.kind != "sync":
            continue
        sync_202 += a.status == 202
        finished = [float(final.get(t, {}).get("finished_at") or 0) for t in a.tasks]
        delays = [a.answered_at - f for f in finished if f > 0]
        late += any(d > LATE_SECONDS for d in delays)
        latest = max([latest, *delays])
    resume, slow, stalled = _workers_resume(final.values(), fault_at, set(killed_workers))
    duration = max((a.sent_at for a in answers), default=0) - min(
        (a.sent_at for a in answers), default=0
    )
    return Figures(
        fault=fault,
        submits=len(answers),
        rate=round(len(answers) / duration, 1) if duration else 0.0,
        accepted=len(accepted),
        tasks=len(expected),
        lost=len(lost),
        wrong_200=len(wrong),
        refused_503=statuses[503],
        other_refusals={k: v for k, v in refusals.items() if not k.startswith("503:")},
        no_answer=statuses[0],
        first_accept_s=None if first is None else round(first, 2),
        last_503_s=round(max(refused_times), 2) if refused_times else None,
        delivered_twice=sum(
            1 for t in expected if int(final.get(t, {}).get("deliveries") or 0) > 1
        ),
        called_twice=len(twice),
        refused_ran=refused_ran,
        reconciled=sum(1 for t in expected if int(final.get(t, {}).get("reconciled") or 0) > 0),
        late_waiters=late,
        latest_answer_s=round(latest, 2),
        sync_202=sync_202,
        resume_s=resume,
        slow_workers=slow,
        stalled_workers=stalled,
        lost_ids=lost_detail,
        twice_ids=twice[:10],
        wrong_ids=wrong[:20],
    )


def _describe(task: str, kind: Kind, fields: dict[str, str], fault_at: float) -> str:
    """A lost task for the report: its id, how it was asked, and its record's state."""
    created = float(fields.get("created_at") or 0)
    return (
        f"{task} ({kind}) status={fields.get('status', 'missing')} "
        f"deliveries={fields.get('deliveries', 0)} worker={fields.get('worker', '-')} "
        f"created={created - fault_at:+.2f}s after the fault"
    )


def _result(fields: dict[str, str]) -> object:
    raw = fields.get("result")
    if raw is None or fields.get("result_type"):
        return raw
    return json.loads(raw)


def _workers_resume(
    records: Iterable[dict[str, str]], fault_at: float, killed: set[str]
) -> tuple[float | None, int, int]:
    """(longest time a worker took to finish a task it started after the fault, workers slower
    than RESUME_LIMIT, workers that finished something before the fault and started nothing
    after), killed workers left out. A task already running when the fault hit may finish at
    once: only work fetched after the fault shows the worker's connections work again."""
    before: set[str] = set()
    first_after: dict[str, float] = {}
    for fields in records:
        worker, finished = fields.get("worker", ""), float(fields.get("finished_at") or 0)
        if not worker or not finished or worker.split("@")[0] in killed:
            continue
        if finished < fault_at:
            before.add(worker)
        elif float(fields.get("started_at") or 0) >= fault_at:
            first_after[worker] = min(first_after.get(worker, finished), finished)
    waits = [t - fault_at for t in first_after.values()]
    resume = round(max(waits), 2) if waits else None
    return resume, sum(1 for w in waits if w > RESUME_LIMIT), len(before - set(first_after))
