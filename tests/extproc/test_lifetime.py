"""One stream's lifetime (`lifetime.serve`) on in-memory read and write: how it ends, and how it fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar import Context, Plugin
from sidecar.chains import Chain
from sidecar.errors import ProtocolError, StreamFailure
from sidecar.extproc.lifetime import serve
from sidecar.extproc.metrics import Metrics
from sidecar.extproc.processor import StreamProcessor

pytestmark = pytest.mark.asyncio


class Explode(Plugin):
    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
            await asyncio.sleep(0)
            raise RuntimeError("plugin bug")


class Echo(Plugin):
    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk


class Envoy:
    """Envoy's end of an in-memory stream: messages in a queue; None half-closes."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
        self.sent: list[pb.ProcessingResponse] = []

    def send(self, kind: str, **fields: Any) -> None:
        self.incoming.put_nowait(pb.ProcessingRequest(**{kind: fields}))

    async def read(self) -> pb.ProcessingRequest | None:
        return await self.incoming.get()

    async def write(self, response: pb.ProcessingResponse) -> None:
        self.sent.append(response)


async def test_a_pipeline_failure_ends_the_stream_while_it_waits_for_envoy() -> None:
    envoy, metrics = Envoy(), Metrics()
    processor = StreamProcessor(Chain("c", [Explode()]), metrics=metrics)
    envoy.send("request_headers")
    envoy.send("request_body", body=b"a", end_of_stream=False)  # Envoy sends no more: serve waits in read()
    with pytest.raises(StreamFailure, match="Explode' failed in on_request_stream"):  # one exception, not a group
        await asyncio.wait_for(serve(processor, envoy.read, envoy.write), 5)
    assert [r.request_body.response.body_mutation.streamed_response.body for r in envoy.sent[1:]] == [b"a"]
    assert metrics.active == 0
    this = asyncio.current_task()
    assert this is not None and this.cancelling() == 0  # the caller is left with no cancellation to undo


async def test_a_protocol_error_from_read_ends_the_stream() -> None:
    async def read() -> pb.ProcessingRequest | None:
        raise ProtocolError("malformed ProcessingRequest")

    processor = StreamProcessor(Chain("c", [Echo()]))
    with pytest.raises(ProtocolError, match="malformed"):
        await serve(processor, read, Envoy().write)


async def test_half_close_ends_the_stream_and_its_pipelines() -> None:
    envoy = Envoy()
    processor = StreamProcessor(Chain("c", [Echo()]))
    envoy.send("request_headers")
    envoy.send("request_body", body=b"a", end_of_stream=False)
    envoy.incoming.put_nowait(None)  # Envoy is done before the body ended: the pipeline is stopped
    await asyncio.wait_for(serve(processor, envoy.read, envoy.write), 5)
    assert envoy.sent[0].HasField("request_headers")


async def test_cancelling_the_caller_cancels_the_stream() -> None:
    envoy = Envoy()
    processor = StreamProcessor(Chain("c", [Echo()]))
    envoy.send("request_headers")
    envoy.send("request_body", body=b"a", end_of_stream=False)
    task = asyncio.create_task(serve(processor, envoy.read, envoy.write))
    while len(envoy.sent) < 2:  # the headers answer and the echoed chunk
        await asyncio.sleep(0.001)
    task.cancel()  # Envoy reset the stream, or the server stops
    with pytest.raises(asyncio.CancelledError):
        await task


class Rewrite(Plugin):
    """STREAMED: each chunk replaced by a new one; b"meta" also sets metadata, b"drop" is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[bytes] = []

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        if chunk == b"meta":
            ctx.set_metadata("seen", True)
        out = b"" if chunk == b"drop" else chunk.upper()
        self.outputs.append(out)
        return out


async def test_new_streamed_chunks_go_out_encoded_and_in_order() -> None:
    """A transport that writes encoded pieces gets each new chunk as (head, the hook's own bytes), with no
    message built around it and nothing copied, metadata a hook set included; clear_body and Envoy's
    observability mode go as before; all in order."""
    envoy, plugin = Envoy(), Rewrite()
    processor = StreamProcessor(Chain("c", [plugin]))
    written: list[tuple[bytes, ...]] = []

    async def write_encoded(message: bytes, *more: bytes) -> None:
        written.append((message, *more))
        envoy.sent.append(pb.ProcessingResponse.FromString(b"".join((message, *more))))

    envoy.send("request_headers")
    for chunk in (b"ab", b"meta", b"drop", b"x" * 300_000):
        envoy.send("request_body", body=chunk, end_of_stream=False)
    observed = pb.ProcessingRequest(request_body=pb.HttpBody(body=b"quiet"), observability_mode=True)
    envoy.incoming.put_nowait(observed)  # Envoy wants no answer to it: none is written
    envoy.incoming.put_nowait(None)
    await asyncio.wait_for(serve(processor, envoy.read, envoy.write, write_encoded), 5)

    mutations = [r.request_body.response.body_mutation for r in envoy.sent[1:]]
    assert [m.WhichOneof("mutation") for m in mutations] == ["body", "body", "clear_body", "body"]
    assert [m.body for m in mutations] == [b"AB", b"META", b"", b"X" * 300_000]
    assert envoy.sent[2].dynamic_metadata["envoy-sidecar"]["seen"] is True  # encoded before the body's field
    assert b"envoy-sidecar" in written[1][0]
    assert [r.HasField("dynamic_metadata") for r in envoy.sent[1:]] == [False, True, False, False]  # it went once
    assert [pieces[1] for pieces in written] == [b"AB", b"META", b"X" * 300_000]
    assert written[2][1] is plugin.outputs[3]  # the hook's bytes handed to the transport, not a copy
