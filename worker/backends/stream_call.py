"""A streamed call's body: its protocol's decoder fed as the answer arrives, each output sent on.

caller.py sends a streamed call (`call.stream`) as any other: the same request (the protocol
asks for a stream, see openai.py and oip.py), timeouts, span and error mapping up to the
headers. Once a 2xx's headers are in, `StreamedCall.read` takes the body: every read goes to
the protocol's decoder (stream_decoder.py), every HTTP/1.1 chunk end too, and every output the
decoder completes goes to the sink (the task's stream, worker/stream_writer.py) before the next
read. The final answer is the decoder's `end()`: what the non-streamed call would return.

Timeouts: the backend's read timeout bounds each read, not the whole body (a model may stream
for minutes, each token well within it); the task's deadline bounds the whole body.

Retries, the choice made here: a call is retried (caller.py's backoff) only while it has sent
no output. Once one output is in the task's stream, a second HTTP attempt would write the same
chunks again under the same delivery, and the stream has no mark for that: its restart marks
are per delivery of the task (lua/stream_append.lua refuses a second restart of one attempt as
stale), so readers could not tell the duplicates. So every failure after the first output fails
the task: a cut body or a silent server becomes StreamBroken (not retryable), the chunks
already sent stay readable, and the error event ends the stream. Before the first output (a 503,
a refused connection, a 200 that sent nothing within the read timeout) a retry writes nothing
twice, and is the same retry a non-streamed call gets. A body cut short is StreamBroken even
before any output: the server broke the stream it had begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from shared.backends import Protocol as Wire
from shared.errors import DeadlineExceeded, DispatchError, StreamBroken
from shared.models import PredictionCall
from worker.backends.base import Answer, BackendClient
from worker.backends.stream_decoder import StreamContext, StreamDecoder, cut_short
from worker.backends.stream_oip import OIPStream
from worker.backends.stream_openai import OpenAIStream
from worker.backends.stream_torchserve import TorchServeStream
from worker.http_client import HttpError, ReadTimeout, Reply

DECODERS: Mapping[Wire, Callable[[StreamContext], StreamDecoder]] = {
    Wire.torchserve: TorchServeStream,
    Wire.oip: OIPStream,
    Wire.openai: OpenAIStream,
}


class OutputSink(Protocol):
    """Where a streamed call's outputs go, one at a time, in order: the task's stream. A sink
    that cannot take one (a cap, an ended stream) raises a DispatchError, which ends the call."""

    async def output(self, value: Any) -> None: ...


class DiscardOutputs:
    """The sink of a streamed call with nowhere to send its outputs: only its answer counts."""

    async def output(self, value: Any) -> None:
        return None


@runtime_checkable
class StreamingReply(Reply, Protocol):
    """A reply whose body can be read as it arrives, chunk ends marked (http_client.Response)."""

    def pieces(self) -> AsyncGenerator[bytes | None, None]: ...


async def body_pieces(reply: Reply) -> AsyncGenerator[bytes | None, None]:
    """The body of `reply` as it arrives: bytes, and None where an HTTP/1.1 chunk ended.

    A reply that cannot stream (a test's canned one) gives its whole body at once, with no
    chunk end: every transport is read the same way."""
    if isinstance(reply, StreamingReply):
        async with contextlib.aclosing(reply.pieces()) as pieces:
            async for piece in pieces:
                yield piece
        return
    yield await reply.read()


class StreamedCall:
    """One streamed call over all its attempts: `sent` counts the outputs its sink took."""

    def __init__(
        self, client: BackendClient, call: PredictionCall, sink: OutputSink | None = None
    ) -> None:
        self.client, self.call = client, call
        self.sink: OutputSink = DiscardOutputs() if sink is None else sink
        self.sent = 0

    async def read(self, reply: Reply, where: str, read_timeout: float) -> Answer:
        """The answer of a 2xx streamed `reply`, its outputs sent on as they complete; a
        DispatchError when the stream ends wrong, the deadline passes, or the sink refuses.
        Closes `reply` whatever happens (an abandoned stream's connection is closed)."""
        context = StreamContext(
            where, self.call.operation, reply.header("content-type"), self.client.redact
        )
        decoder = DECODERS[self.client.backend.protocol](context)
        deadline = asyncio.timeout(max(0.0, self.call.deadline - time.time()))
        try:
            async with deadline, contextlib.aclosing(body_pieces(reply)) as pieces:
                async for piece in pieces:
                    await self._send(decoder.chunk_end() if piece is None else decoder.feed(piece))
            await self._send(decoder.chunk_end())  # the body's end ends its last chunk
            return decoder.end()
        except TimeoutError as error:
            if not deadline.expired():
                raise
            raise DeadlineExceeded(
                f"{where} was still streaming when the task's deadline passed"
            ) from error
        except ReadTimeout as error:
            raise self._silent(where, read_timeout) from error
        except HttpError as error:  # ProtocolError: closed mid-body, or not HTTP/1.1 any more
            raise cut_short(where) from error
        finally:
            await reply.aclose()

    async def _send(self, outputs: list[Any]) -> None:
        for output in outputs:
            await self.sink.output(output)
            self.sent += 1

    def _silent(self, where: str, read_timeout: float) -> DispatchError:
        """The error of a streamed body that sent nothing for a whole read timeout."""
        if read_timeout < self.client.backend.read_timeout:  # cut to the deadline's rest
            return DeadlineExceeded(f"{where} was still streaming when the task's deadline passed")
        if self.sent:  # not retryable: the outputs already sent would be sent again
            return StreamBroken(
                f"{where} sent nothing for {read_timeout:g}s in the middle of a streamed answer"
            )
        return self.client.timeout(f"{where} did not stream within {read_timeout:g}s")
