"""The sink of a streamed task's outputs: each one appended to the task's Redis stream at once.

One `StreamWriter` per delivery of a streamed task (worker/messages.py builds it once START
said run, with the delivery count START returned as its attempt); the caller's streamed call
(worker/backends/stream_call.py) hands it every output as the backend produced it. It appends
through stream_append (shared/redis_state/stream_scripts.py), which checks the attempt's caps
and writes in one step:

- `appended`: the chunk is readable; the next one may come.
- a cap refused (STREAM_MAX_ENTRIES, STREAM_MAX_BYTES): nothing was written, and the writer
  stops for good (a later, smaller chunk could fit, and the stream would have a hole). It
  raises StreamBroken naming the setting and its value (never the data), which ends the call
  and fails the task; the chunks already appended stay readable, and the error event still
  fits, since the ending is not capped.
- `ended` (the stream holds its error or done: the task was canceled, or another delivery
  ended it; every ending of a streamed task writes it, lib.lua end_stream) or `stale` (a newer
  delivery of the task writes the stream): this delivery's output is no longer wanted; the
  writer raises, which ends the call and closes its upstream
  connection.

Each entry's data is the output as JSON text (compact, UTF-8): an object as itself, a text
chunk or a data URI as a JSON string. So a reader parses every `output` event's data the same
way and gets what the backend produced, with no guess between text that looks like JSON and
JSON.

A first output of a redelivered task gets a restart mark written before it by the script; a
redelivery says so at once with `begin()` (data `{"attempt": n}`), before its model produced
anything.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from shared.errors import DispatchError, StreamBroken
from shared.redis_state.stream_scripts import Appended, AppendOutcome, AppendToStream, StreamLimits
from shared.redis_state.streams import StreamKind
from worker.backends.base import encode_json

log = logging.getLogger(__name__)


class StreamWriter:
    """Appends one delivery's outputs to its task's stream, and the stream's ending."""

    def __init__(
        self, append: AppendToStream, task_id: str, attempt: int, limits: StreamLimits
    ) -> None:
        if attempt < 1:
            raise ValueError("attempt counts deliveries, from 1")
        self._append, self.task_id, self.attempt, self.limits = append, task_id, attempt, limits
        self.sent = 0  # outputs appended
        self.stopped: DispatchError | None = None  # why no more output is taken, once refused

    async def begin(self) -> None:
        """A redelivery's restart mark, written before it calls its backend: readers learn at
        once that what follows is a new attempt (a first delivery writes nothing)."""
        if self.attempt > 1:
            appended = await self._write(StreamKind.restart, f'{{"attempt":{self.attempt}}}')
            if appended.outcome is not AppendOutcome.appended:
                log.info("task %s: no restart mark (%s)", self.task_id, appended.outcome.value)

    async def output(self, value: Any) -> None:
        """Append one output; a DispatchError when it cannot be (see the module's docstring)."""
        if self.stopped is not None:
            raise self.stopped
        try:
            data = encode_json(value)
        except ValueError:  # NaN or Infinity: not JSON, a reader could not parse it
            raise self._stop(
                StreamBroken("a streamed chunk holds NaN or Infinity, which JSON cannot carry")
            ) from None
        appended = await self._write(StreamKind.output, data.decode())
        if appended.outcome is AppendOutcome.appended:
            self.sent += 1
            return
        raise self._stop(self._refused(appended.outcome))

    async def _write(self, kind: StreamKind, data: str) -> Appended:
        try:
            return await self._append(
                self.task_id, kind, data, attempt=self.attempt, limits=self.limits
            )
        except RedisError as error:
            # The chunk cannot be kept: going on would leave a hole in the stream.
            raise self._stop(
                DispatchError(
                    f"the task's stream could not be written (Redis: {type(error).__name__})"
                )
            ) from error

    def _refused(self, outcome: AppendOutcome) -> DispatchError:
        refusal = self.limits.refusal(outcome)
        if refusal is not None:
            return StreamBroken(f"{refusal}; the chunks before it stay readable")
        if outcome is AppendOutcome.ended:
            return StreamBroken(
                "the task's stream had already ended (the task was canceled or another delivery "
                "finished it); its call was stopped"
            )
        return StreamBroken(
            f"a newer delivery of the task writes its stream (this is delivery {self.attempt}); "
            "its call was stopped"
        )

    def _stop(self, error: DispatchError) -> DispatchError:
        self.stopped = error
        return error
