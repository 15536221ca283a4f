"""FULL_DUPLEX_STREAMED bodies through a chain that has async-generator (`on_*_stream`) hooks.

Envoy sends body chunks as they arrive and expects `streamed_response` chunks back at the server's own
pace. Input chunks go through a small bounded queue into the chain's stages, each an async iterator of
`(bytes, end_of_stream)` pairs; what comes out goes through another small queue to a task that sends it,
the outputs that are ready together as one `streamed_response` (Envoy parses, times and forwards each
message: a hook yielding many small pieces cost it one message per piece). Memory stays bounded: a stage
that stops reading makes the input queue full, and the feeder then waits (back-pressuring Envoy over
gRPC flow control) for at most the stream deadline before failing the stream; a sender that cannot send
makes the output queue full, and the stages wait.

Envoy applies no message timeout in this mode, so every wait here has a deadline: a stalled or buggy
plugin costs the client a 500 (the gRPC stream is failed), never a hang. The pipeline is a task of the
stream's task group (`lifetime.serve`): its failure is an exception, which fails the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from sidecar.chains import EXPECTED_IN_STREAM, BodyStage, Hook
from sidecar.errors import StreamFailure
from sidecar.plugins import Context

__all__ = ["DuplexPipe", "SendChunk", "as_body", "call_chunk"]

_QUEUE_CHUNKS = 4  # chunks of at most ~1 MiB each from Envoy
#: Outputs waiting to be sent, at most: their bytes (one output more may take them past it; a larger one
#: waits alone) and their count. Those ready together go as one message of at most _OUTBOX_BYTES.
_OUTBOX_BYTES = 1024 * 1024  # Envoy's own chunks are about 1 MiB
_OUTBOX_ITEMS = 1024
#: Pieces of a message smaller than this on average are joined (one copy) rather than written as views.
_JOIN_PIECES_BELOW = 16 * 1024

Item = tuple[bytes, bool]


class SendChunk(Protocol):
    """One `streamed_response` to Envoy: its body is `body` and `more` end to end."""

    def __call__(self, kind: str, body: bytes, end_of_stream: bool, *more: bytes) -> Awaitable[None]: ...


#: Reports a plugin's failure in a body stage (logged, counted) and gives the error that fails the stream.
Fault = Callable[[str, BodyStage, BaseException], StreamFailure]


class DuplexPipe:
    """One direction's body pipeline for one stream, running as a task of the stream's lifetime.

    A failure (a plugin bug, a stage that breaks the rules, a missed deadline) ends that task with
    StreamFailure; the stream's task group then cancels everything else and the stream fails with it.
    """

    def __init__(
        self,
        kind: str,
        stages: tuple[BodyStage, ...],
        ctx: Context,
        send: SendChunk,
        deadline: float,
        tasks: asyncio.TaskGroup,
        fault: Fault,
    ) -> None:
        self.kind = kind
        self.ctx = ctx
        self.deadline = deadline
        self._send = send
        self._queue: asyncio.Queue[Item] = asyncio.Queue(_QUEUE_CHUNKS)
        self._outbox = _Outbox()
        self._ended = False
        self._ended_by_trailers = False
        #: Once Envoy ended the body: when the pipeline must have finished (loop time).
        self._finish_by: float | None = None
        self._deadline: asyncio.Timeout | None = None
        stream: AsyncIterator[Item] = self._source()
        for stage in stages:
            stage_of = _chunk_stage if stage.kind == "chunk" else _stream_stage
            stream = stage_of(stage, ctx, stream, functools.partial(fault, kind, stage))
        self._sender = tasks.create_task(self._send_outputs())
        self._task = tasks.create_task(self._run(stream))

    async def _source(self) -> AsyncIterator[Item]:
        while True:
            item = await self._queue.get()
            yield item
            if item[1]:
                return

    async def _run(self, stream: AsyncIterator[Item]) -> None:
        # Envoy waits for the end of the body with no timeout of its own in this mode: bound it here,
        # from the moment Envoy's input ended (see `feed`).
        deadline = self._deadline = asyncio.timeout_at(self._finish_by)
        try:
            async with deadline:
                async for body, end in stream:
                    if body or end:
                        await self._outbox.put(body, end)
                    if end:
                        await self._sender  # sent, all of it: trailers may be answered now
                        return
        except StreamFailure:
            raise  # a stage's plugin failed, already reported with its name and an error id
        except Exception as exc:
            if deadline.expired():
                raise StreamFailure(
                    f"{self.kind}: plugins did not finish the body within {self.deadline:g}s of its end"
                ) from None
            raise StreamFailure(f"{self.kind}: body pipeline failed: {type(exc).__name__}") from exc
        raise StreamFailure("body pipeline ended without end of stream")

    async def _send_outputs(self) -> None:
        """Send the stages' outputs in order, those waiting together as one message. Nothing waits for more
        to come: an output goes as soon as this task runs, so outputs merge only when they come faster
        than they can be sent (many small ones from one input chunk, or while Envoy's window is full)."""
        while True:
            pieces, end = await self._outbox.take()
            if len(pieces) > 1 and sum(map(len, pieces)) < _JOIN_PIECES_BELOW * len(pieces):
                pieces = [b"".join(pieces)]
            body, *more = pieces or [b""]
            try:
                await self._send(self.kind, body, end and not self._ended_by_trailers, *more)
            except (StreamFailure, asyncio.CancelledError):
                raise
            except Exception as exc:  # the connection went, or metadata changed after set_metadata: the stream's
                raise StreamFailure(f"{self.kind}: sending the body failed: {type(exc).__name__}") from exc
            if end:
                return

    async def feed(self, body: bytes, end_of_stream: bool) -> None:
        """Hand one chunk from Envoy to the pipeline; waits while the pipeline is full."""
        if self._ended:
            raise StreamFailure("body chunk after end of stream")
        self._ended = end_of_stream
        if self._queue.full():
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for may swallow the cancellation that
                # fails this stream when the put completes at the same moment.
                async with asyncio.timeout(self.deadline):
                    await self._queue.put((body, end_of_stream))
            except TimeoutError:
                raise StreamFailure(f"{self.kind}: plugins did not take input for {self.deadline:g}s") from None
        else:  # room in the queue: no deadline to arm (a timer per chunk was a third of this path's cost)
            self._queue.put_nowait((body, end_of_stream))
        if end_of_stream:
            self._finish_by = asyncio.get_running_loop().time() + self.deadline
            # Not started yet: it starts with this deadline. Finished already (a stage may stop early): none.
            if self._deadline is not None and not self._task.done():
                self._deadline.reschedule(self._finish_by)

    async def end_with_trailers(self) -> None:
        """Trailers ended the body: flush every stage, then return (the trailers answer goes after)."""
        self._ended_by_trailers = True
        if not self._ended:
            await self.feed(b"", True)
        try:
            async with asyncio.timeout(self.deadline):
                await asyncio.shield(self._task)
        except TimeoutError:
            raise StreamFailure(f"{self.kind}: plugins did not finish the body within {self.deadline:g}s") from None

    def cancel(self) -> None:
        self._task.cancel()
        self._sender.cancel()


class _Outbox:
    """The outputs of a pipeline waiting to be sent, bounded by _OUTBOX_BYTES and _OUTBOX_ITEMS: a stage
    that gets ahead of the sender waits for it (and, through the input queue, so does Envoy)."""

    __slots__ = ("_bytes", "_ended", "_items", "_putter", "_taker")

    def __init__(self) -> None:
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._ended = False
        self._putter: asyncio.Future[None] | None = None
        self._taker: asyncio.Future[None] | None = None

    async def put(self, body: bytes, end: bool) -> None:
        while self._items and (self._bytes >= _OUTBOX_BYTES or len(self._items) >= _OUTBOX_ITEMS):
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        if body:
            self._items.append(body)
            self._bytes += len(body)
        self._ended = self._ended or end
        _wake(self._taker)

    async def take(self) -> tuple[list[bytes], bool]:
        """What waits, in order, up to _OUTBOX_BYTES (or the first output, whatever its size); and whether
        the end of the body is among it."""
        while not self._items and not self._ended:
            self._taker = asyncio.get_running_loop().create_future()
            await self._taker
        items = self._items
        pieces: list[bytes] = []
        size = 0
        while items and (not pieces or size + len(items[0]) <= _OUTBOX_BYTES):
            piece = items.popleft()
            pieces.append(piece)
            size += len(piece)
        self._bytes -= size
        _wake(self._putter)
        return pieces, self._ended and not items


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def as_body(result: Any, hook: Hook, expected: str | None = None) -> bytes:
    """A body or chunk hook's result as bytes (None and Respond are handled by the caller)."""
    if isinstance(result, bytes):
        return result
    if isinstance(result, bytearray | memoryview):
        return bytes(result)
    if isinstance(result, str):
        return result.encode()
    raise hook.wrong(result, expected)


async def call_chunk(stage: BodyStage, ctx: Context, body: bytes, end: bool) -> bytes:
    """A chunk hook inside a FULL_DUPLEX stream, where output may already be on its way: no Respond."""
    result = await stage.hook(ctx, body, end)
    if result is None:
        return body
    return as_body(result, stage.hook, EXPECTED_IN_STREAM)


StageFault = Callable[[BaseException], StreamFailure]


async def _chunk_stage(
    stage: BodyStage, ctx: Context, items: AsyncIterator[Item], fault: StageFault
) -> AsyncIterator[Item]:
    async for body, end in items:
        try:
            out = await call_chunk(stage, ctx, body, end)
        except Exception as exc:  # the plugin's, not the stages before it (those fail in `items`)
            raise fault(exc) from None
        if out or end:
            yield out, end


async def _stream_stage(
    stage: BodyStage, ctx: Context, items: AsyncIterator[Item], fault: StageFault
) -> AsyncIterator[Item]:
    async def plain() -> AsyncIterator[bytes]:
        async for body, _end in items:
            if body:
                yield body

    source = plain()
    try:
        outputs: Any = stage.hook.func(ctx, source)
    except Exception as exc:
        raise fault(exc) from None
    try:
        while True:
            try:
                out = await outputs.__anext__()
            except StopAsyncIteration:
                break
            except StreamFailure:
                raise  # a stage before this one failed while this plugin read its input
            except Exception as exc:
                raise fault(exc) from None
            if isinstance(out, bytes):
                data = out
            elif isinstance(out, bytearray | memoryview | str):
                data = out.encode() if isinstance(out, str) else bytes(out)
            else:
                raise fault(stage.hook.wrong(out, "bytes or str (a Respond is not possible mid-stream)", "yielded"))
            if data:
                yield data, False
        # A hook may stop early (e.g. truncate): drain what is left so Envoy's input is not blocked.
        async for _ in source:
            pass
    finally:
        with contextlib.suppress(Exception):
            await outputs.aclose()
    yield b"", True
