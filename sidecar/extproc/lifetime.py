"""One ext_proc stream from its first message to its end, whatever carries it.

`serve` runs every stream: the native HTTP/2 transport and grpc.aio hand it their `read` and `write`,
and the in-process test driver (`sidecar.testing.Driver`) hands it in-memory ones. A FULL_DUPLEX stream
is an `asyncio.TaskGroup`: the loop reading Envoy's messages is its body, and the body pipelines are its
tasks; any other stream is that loop alone (a task group per stream cost 12 us of CPU per request and
tripled p99 latency in `make bench`). Whatever fails first (Envoy breaking the protocol, a pipeline
failing or missing its deadline) cancels the rest and leaves `serve` as one exception, which the caller
turns into the stream's end: a gRPC status for a transport, `Result.failed` for the driver. Nothing calls
back up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar.extproc.encoding import WriteEncoded
from sidecar.extproc.processor import StreamProcessor

__all__ = ["Read", "Write", "WriteEncoded", "serve"]

#: Envoy's next message, or None once it half-closed the stream.
Read = Callable[[], Awaitable[pb.ProcessingRequest | None]]
#: One message to Envoy.
Write = Callable[[pb.ProcessingResponse], Awaitable[None]]


async def serve(
    processor: StreamProcessor, read: Read, write: Write, write_encoded: WriteEncoded | None = None
) -> None:
    """Answer Envoy's messages until it half-closes the stream.

    `write_encoded`, when the transport has it, writes a message already encoded in pieces: FULL_DUPLEX
    body chunks, and bodies or chunks a hook replaced in any other mode, then go out without a message
    object and without copying their bytes.

    Raises ProtocolError when Envoy breaks the protocol and StreamFailure when a streaming body cannot go
    on; the stream's other tasks are over by then. Cancelling the caller (Envoy went away, the server
    stops) cancels them too.
    """
    metrics = processor.metrics
    if metrics is not None:
        metrics.stream_opened(processor.chain.name)
    try:
        if processor.full_duplex:
            await _serve_with_pipelines(processor, read, *_one_at_a_time(write, write_encoded))
        else:
            # Nothing but this loop writes: no task group to set up and tear down on the hot path.
            processor.open(write, None, write_encoded)
            try:
                await _answer(processor, read, write)
            finally:
                processor.close()
    finally:
        if metrics is not None:
            metrics.stream_closed()


async def _serve_with_pipelines(
    processor: StreamProcessor, read: Read, write: Write, write_encoded: WriteEncoded | None
) -> None:
    """A FULL_DUPLEX stream: body pipelines run as tasks beside the loop reading Envoy's messages."""
    failure: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            processor.open(write, tasks, write_encoded)
            try:
                await _answer(processor, read, write)
            finally:
                processor.close()  # Envoy is done with the stream (or it failed): stop the pipelines
    except BaseExceptionGroup as group:
        failure = _first(group)
    if failure is not None:
        raise failure  # outside the handler: the group is no context of it


async def _answer(processor: StreamProcessor, read: Read, write: Write) -> None:
    """Answer each of Envoy's messages until it half-closes the stream."""
    metrics = processor.metrics
    while (request := await read()) is not None:
        started = time.perf_counter()
        try:
            response = await processor.process(request)
            if response is not None:
                await write(response)
        except asyncio.CancelledError:
            # Envoy reset the stream while a message was being answered: its message_timeout passed (or the
            # client went away). A reset while waiting for the next message is how Envoy ends a stream after an
            # immediate response: not an error.
            if metrics is not None:
                metrics.stream_error("cancelled")
            raise
        if metrics is not None:
            metrics.observe(request.WhichOneof("request"), time.perf_counter() - started)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The failure that ended the stream; the others (if any) were caused by it."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _one_at_a_time(write: Write, write_encoded: WriteEncoded | None) -> tuple[Write, WriteEncoded | None]:
    """`write` and `write_encoded` taking turns: a message waiting for flow control is never cut into by
    another task's."""
    lock = asyncio.Lock()

    async def write_whole(response: pb.ProcessingResponse) -> None:
        async with lock:
            await write(response)

    if write_encoded is None:
        return write_whole, None
    send = write_encoded

    async def write_encoded_whole(message: bytes, *more: bytes) -> None:
        async with lock:
            await send(message, *more)

    return write_whole, write_encoded_whole
