"""Streaming body modes through the in-process Driver and the stream processor."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar import BodyMode, Context, Plugin, Respond
from sidecar.chains import Chain, Registry
from sidecar.errors import ProtocolError, StreamFailure
from sidecar.extproc.encoding import encode_new_body, encode_streamed, streamed_response
from sidecar.extproc.lifetime import serve
from sidecar.extproc.processor import StreamProcessor
from sidecar.testing import Driver, Request, Response
from tests.support import testplugins as tp
from tests.support.wait import wait_until


class Upper(Plugin):
    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        return chunk.upper() + (b"!" if end else b"")

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes | None:
        return b"" if chunk == b"drop" else None


class Partial(Plugin):
    request_body = BodyMode.BUFFERED_PARTIAL

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bool]] = []

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
        self.seen.append((chunk, end))


class Doubler(Plugin):
    """FULL_DUPLEX: every input chunk comes out twice, as two chunks."""

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
            yield chunk

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk + chunk


class Joiner(Plugin):
    """FULL_DUPLEX: holds everything, emits one chunk at the end (0 outputs per input, then 1)."""

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        parts = [chunk async for chunk in chunks]
        yield b"|".join(parts)

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield b"<" + chunk + b">"


class _Confetti(Plugin):
    """FULL_DUPLEX request: every input chunk comes out as 100-byte pieces."""

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            for start in range(0, len(chunk), 100):
                yield chunk[start : start + 100]


class Stall(Plugin):
    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
        await asyncio.Event().wait()  # never ends the stream
        yield b"unreachable"


class Explode(Plugin):
    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if b"boom" in chunk:
                raise RuntimeError("plugin bug")
            yield chunk


class RaiseOnChunk(Plugin):
    name = "raise-on-chunk"

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes | Respond:
        if chunk == b"boom":
            raise RuntimeError("bad chunk")
        if chunk == b"stop":
            return Respond(413, b"stopped mid-stream")
        return chunk + b"."


def test_streamed_replace_resize_and_drop() -> None:
    result = Driver([Upper()]).run(Request("POST", body=[b"ab", b"c"]), Response(body=[b"x", b"drop", b"y"]))
    assert result.upstream is not None
    # No content-length: as with HTTP/1 chunked encoding, Envoy sends the end alone, as an empty chunk.
    assert result.upstream.chunks == [b"AB", b"C", b"!"]
    assert result.response.body == b"xy"
    assert result.phases == ["request_headers"] + ["request_body"] * 3 + ["response_headers"] + ["response_body"] * 4
    framed = Driver([Upper()]).run(Request("POST", "/", {"content-length": "3"}, [b"ab", b"c"]))
    assert framed.upstream is not None and framed.upstream.chunks == [b"AB", b"C!"]  # the last chunk ends it
    assert "content-length" not in framed.upstream.headers  # a streamed body goes on chunked


def test_buffered_partial_sees_one_chunk_with_completeness() -> None:
    plugin = Partial()
    Driver([plugin]).run(Request("POST", body=[b"ab", b"cd"]))
    assert plugin.seen == [(b"abcd", True)]


def test_full_duplex_composes_in_both_directions() -> None:
    # request: Doubler then Joiner; response hooks run in reverse: Joiner then Doubler.
    result = Driver([Doubler(), Joiner()]).run(Request("POST", body=[b"a", b"b"]), Response(body=[b"x", b"y"]))
    assert result.failed is None
    assert result.upstream is not None and result.upstream.body == b"a|a|b|b"
    assert result.response.chunks == [b"<x><x>", b"<y><y>"]


def test_full_duplex_with_trailers_flushes_before_them() -> None:
    result = Driver([Joiner()]).run(Request("POST", body=[b"a", b"b"], trailers={"x-t": "1"}))
    assert result.upstream is not None and result.upstream.body == b"a|b"
    assert result.upstream.trailers["x-t"] == "1"


def test_full_duplex_stall_fails_within_the_deadline() -> None:
    started = time.monotonic()
    result = Driver([Stall()], stream_timeout=0.3).run(Request(), Response(body=[b"a"]))
    assert result.failed is not None and "did not finish" in result.failed
    assert time.monotonic() - started < 3


def test_full_duplex_plugin_error_fails_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="sidecar.extproc"):
        result = Driver([Explode()]).run(Request(), Response(body=[b"ok", b"boom"]))
    # The stream's failure names the plugin and the hook; the exception's text goes to the log only.
    assert result.failed is not None
    assert "plugin 'Explode' failed in on_response_stream (error id " in result.failed
    assert "plugin bug" not in result.failed
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    error_id = result.failed.split("error id ")[1].rstrip(")")
    assert "plugin bug" in record.getMessage() and error_id in record.getMessage()


def test_streamed_failure_policies_mid_stream(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.CRITICAL, logger="sidecar.extproc"):
        closed = Driver([RaiseOnChunk()]).run(Request("POST", body=[b"a", b"boom", b"c"]))
        opened = Driver([RaiseOnChunk()], on_error="fail_open").run(Request("POST", body=[b"a", b"boom", b"c"]))
    assert closed.immediate and closed.status == 500
    assert opened.upstream is not None
    assert opened.upstream.chunks == [b"a.", b"boom", b"c"]  # bypassed from the failure on


def test_respond_mid_request_body() -> None:
    result = Driver([RaiseOnChunk()]).run(Request("POST", body=[b"a", b"stop", b"c"]))
    assert result.immediate and result.status == 413
    assert result.phases.count("request_body") == 2


def _message(kind: str, **fields: Any) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(**{kind: fields})


async def serve_messages(
    processor: StreamProcessor, messages: list[pb.ProcessingRequest]
) -> list[pb.ProcessingResponse]:
    """The stream lifetime on these messages, then Envoy's half-close; what the server wrote."""
    incoming = iter([*messages, None])
    sent: list[pb.ProcessingResponse] = []

    async def read() -> pb.ProcessingRequest | None:
        return next(incoming)

    async def write(response: pb.ProcessingResponse) -> None:
        sent.append(response)

    await serve(processor, read, write)
    return sent


def test_body_for_a_direction_envoy_should_not_send() -> None:
    processor = StreamProcessor(Chain("c", [tp.AddHeaders()]))

    async def run() -> None:
        await processor.process(_message("request_headers"))
        await processor.process(_message("request_body", body=b"x", end_of_stream=True))

    with pytest.raises(ProtocolError, match="sends none"):
        asyncio.run(run())


def test_full_duplex_chunk_after_end_of_stream() -> None:
    processor = StreamProcessor(Chain("c", [Doubler()]))
    messages = [
        _message("request_headers"),
        _message("request_body", body=b"x", end_of_stream=True),
        _message("request_body", body=b"y", end_of_stream=False),
    ]
    with pytest.raises(StreamFailure, match="after end of stream"):
        asyncio.run(serve_messages(processor, messages))


def test_full_duplex_pass_through_for_chains_without_body_hooks() -> None:
    registry = Registry([Chain("default", [Doubler()]), Chain("plain", [tp.AddHeaders()])])
    result = Driver(registry, chain="plain").run(Request("POST", body=[b"a", b"b"]), Response(body=[b"z"]))
    assert result.failed is None
    assert result.upstream is not None and result.upstream.chunks == [b"a", b"b"]
    assert result.response.body == b"z"


def test_extend_timeout_sends_an_override_message() -> None:
    class Slow(Plugin):
        async def on_request_headers(self, ctx: Context, headers: Any) -> None:
            await ctx.extend_timeout(2.5)

    processor = StreamProcessor(Chain("c", [Slow()]))
    sent = asyncio.run(serve_messages(processor, [_message("request_headers")]))
    assert [r.override_message_timeout.ToTimedelta().total_seconds() for r in sent[:1]] == [2.5]
    assert sent[1].HasField("request_headers")  # the answer goes after
    result = Driver([Slow()]).run(Request())  # Envoy waits longer, then gets the answer
    assert result.failed is None and result.phases == ["request_headers"]


def test_processing_mode_checks_for_full_duplex() -> None:
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

    from sidecar.errors import ConfigError
    from sidecar.translate.bootstrap import check_processing_mode

    mode = processing_mode_pb2.ProcessingMode(
        response_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
        response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
    )
    with pytest.raises(ConfigError, match="needs response_trailer_mode SEND"):
        check_processing_mode(mode, failure_mode_allow=False)
    mode.response_trailer_mode = processing_mode_pb2.ProcessingMode.SEND
    check_processing_mode(mode, failure_mode_allow=False)
    with pytest.raises(ConfigError, match="cannot fail open"):
        check_processing_mode(mode, failure_mode_allow=True)


def test_full_duplex_chunk_hook_failing_on_the_trailer_flush_fails_the_stream() -> None:
    class FlushBomb(Plugin):
        request_body = BodyMode.FULL_DUPLEX_STREAMED

        def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
            if end:
                raise RuntimeError("cannot flush")
            return chunk

    result = Driver([FlushBomb()]).run(Request("POST", body=[b"a"], trailers={"x-t": "1"}))
    assert result.failed is not None and "plugin 'FlushBomb' failed in on_request_chunk" in result.failed


class _MetadataAtTheEnd(Plugin):
    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
        ctx.set_metadata("request_bytes", 3)  # after the input ended

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in chunks:
            seen += len(chunk)
            yield chunk
        ctx.set_metadata("response_bytes", seen)  # after the last message Envoy sends


def test_full_duplex_metadata_set_after_the_input_ended_reaches_envoy() -> None:
    # Issue 16 section 9: it went nowhere (no answer left to carry it); it now goes with the stream's output.
    result = Driver([_MetadataAtTheEnd()]).run(Request("POST", body=[b"abc"]), Response(body=[b"hello", b"!"]))
    assert result.failed is None
    assert result.dynamic_metadata == {"envoy-sidecar": {"request_bytes": 3, "response_bytes": 6}}


class _RefuseSecondChunk(Plugin):
    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> Respond | None:
        return Respond(413, "too much") if chunk == b"second" else None

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> Respond | None:
        return Respond(502, "bad upstream") if chunk == b"bad" else None


def test_a_reply_mid_upload_comes_after_the_upstream_had_the_headers() -> None:
    result = Driver([_RefuseSecondChunk()]).run(Request("POST", "/up", {"x-client": "1"}, [b"first", b"second"]))
    assert result.immediate and result.status == 413
    assert result.response.body == b"too much" and result.response.headers["content-type"] == "text/plain"
    assert result.response.headers["content-length"] == "8"
    upstream = result.upstream
    assert upstream is not None and not upstream.complete  # the headers and the first chunk, then a reset
    assert upstream.headers["x-client"] == "1" and upstream.body == b"first"


def test_a_reply_from_a_response_chunk_cuts_the_upstreams_response() -> None:
    result = Driver([_RefuseSecondChunk()]).run(
        Request(), Response(201, {"x-up": "1", "content-type": "text/csv"}, [b"good,", b"bad", b"never"])
    )
    assert result.cut and not result.immediate
    assert result.status == 201 and result.response.headers["x-up"] == "1"  # the upstream's, already sent
    assert result.response.body == b"good,"
    assert "content-length" not in result.response.headers  # a streamed body goes on without one


@pytest.mark.parametrize("kind", ["request_body", "response_body"])
def test_encoded_chunks_are_exactly_the_messages(kind: str) -> None:
    """The native transport writes FULL_DUPLEX chunks from `encode_streamed`, and bodies or chunks a hook
    replaced in other modes from `encode_new_body`, never building the message: the encoding must be byte
    for byte what protobuf writes, at every varint length boundary."""
    rng = random.Random(kind)
    sizes = {0, 1, 2, 100, 2**21 + 3, 3 * 1024 * 1024}
    sizes |= {edge + delta for edge in (2**7, 2**14, 2**21) for delta in range(-12, 4)}  # where a length grows
    for size in sorted(sizes):
        body = rng.randbytes(size)
        for end in (False, True):
            head, same, tail = encode_streamed(kind, body, end)
            assert same is body  # handed on, not copied
            assert head + body + tail == streamed_response(kind, body, end).SerializeToString(), (size, end)
            cut = [body[: size // 3], body[size // 3 : size // 2], body[size // 2 :]]
            head, *same_pieces, tail = encode_streamed(kind, cut[0], end, *cut[1:])  # several outputs as one
            assert all(a is b for a, b in zip(same_pieces, cut, strict=True))
            assert head + body + tail == streamed_response(kind, body, end).SerializeToString(), (size, end)
        replaced = pb.ProcessingResponse()  # a body or chunk replaced: BodyMutation.body
        getattr(replaced, kind).response.body_mutation.body = body
        head, same = encode_new_body(kind, body)
        assert same is body
        assert head + body == replaced.SerializeToString(), size


class _PartialUpper(Plugin):
    """BUFFERED_PARTIAL: the one chunk Envoy sends upper-cased, its size as metadata."""

    request_body = BodyMode.BUFFERED_PARTIAL

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        ctx.set_metadata("partial_bytes", len(chunk))
        return chunk.upper()


class _ChunkMetadata(Plugin):
    """FULL_DUPLEX chunk hooks (answered inline): metadata on some chunks, one chunk dropped."""

    request_body = BodyMode.FULL_DUPLEX_STREAMED
    response_body = BodyMode.FULL_DUPLEX_STREAMED

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        if chunk == b"mark":
            ctx.set_metadata("marked", True)
        return b"" if chunk == b"drop" else chunk.upper()

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes | None:
        return b"tail" if end else None  # the flush before the trailers carries this


_ENCODED_STREAMS: dict[str, tuple[list[Plugin], list[tuple[str, bytes, bool]]]] = {
    "stream hooks": (
        [Doubler()],
        [("request_body", b"ab", False), ("request_body", b"", True), ("response_body", b"x" * 70_000, True)],
    ),
    "stream hooks, metadata at the end": (
        [_MetadataAtTheEnd()],
        [("request_body", b"abc", True), ("response_body", b"hello", False), ("response_body", b"!", True)],
    ),
    "chunk hooks, metadata, a trailer flush": (
        [_ChunkMetadata()],
        [
            ("request_body", b"mark", False),
            ("request_body", b"drop", False),
            ("request_body", b"z", True),
            ("response_body", b"r" * 20_000, False),
            ("response_trailers", b"", False),
        ],
    ),
    "many small outputs, merged": (
        [_Confetti(), _MetadataAtTheEnd()],
        [("request_body", b"c" * 5_000, False), ("request_body", b"d" * 301, True), ("response_body", b"e", True)],
    ),
    "pass-through beside a headers plugin": (
        [tp.FdPass(), tp.AddHeaders()],
        [("request_body", b"q" * 200_000, True), ("response_body", b"", False), ("response_body", b"s", True)],
    ),
    # Other modes: a body or chunk a hook replaced is encoded by hand too (`processor._new_body`).
    "STREAMED chunks replaced, metadata with each, one cleared": (
        [tp.ChunkUpperTally(), Upper()],
        [
            ("request_body", b"ab", False),
            ("request_body", b"c" * 70_000, True),
            ("response_body", b"drop", False),
            ("response_body", b"r" * 300, True),
        ],
    ),
    "BUFFERED_PARTIAL chunk replaced, metadata": (
        [_PartialUpper()],
        [("request_body", b"p" * 40_000, False), ("request_body", b"lost", True)],
    ),
    "BUFFERED bodies replaced, a new content-length, metadata": (
        [tp.UpperBody(), tp.BodyLengths()],
        [("request_body", b"m" * 20_000, True), ("response_body", b"resp", True)],
    ),
}


@pytest.mark.parametrize("case", sorted(_ENCODED_STREAMS))
def test_an_encoded_writer_sends_what_the_message_writer_sends(case: str) -> None:
    """The same stream served twice: once writing messages (grpcio), once with the native transport's
    encoded writer. Envoy must receive the same messages in the same order, metadata and header changes
    included (a BUFFERED body's new content-length)."""
    plugins, bodies = _ENCODED_STREAMS[case]
    length = sum(len(body) for kind, body, _ in bodies if kind == "request_body")
    content_length = base_pb2.HeaderValue(key="content-length", raw_value=str(length).encode())
    messages = [
        _message("request_headers", headers=base_pb2.HeaderMap(headers=[content_length])),
        _message("response_headers", headers=base_pb2.HeaderMap(headers=[content_length])),
    ]
    for kind, body, end in bodies:
        if kind == "response_trailers":
            messages.append(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
        else:
            messages.append(_message(kind, body=body, end_of_stream=end))
    # A FULL_DUPLEX body is answered by a task: Envoy half-closes once every body's end went out. Other
    # modes answer each message before the next is read.
    full_duplex = StreamProcessor(Chain("c", plugins)).full_duplex
    ends = sum(1 for kind, _, end in bodies if end or kind == "response_trailers") if full_duplex else 0

    async def run(encoded: bool) -> tuple[list[pb.ProcessingResponse], int]:
        incoming = iter([*messages, None])
        sent: list[pb.ProcessingResponse] = []
        pieces_written = 0

        def ended() -> bool:  # every body ended (or its trailers were answered): Envoy may half-close now
            done = [r for r in sent if r.WhichOneof("response") in ("request_body", "response_body")]
            streamed = [getattr(r, r.WhichOneof("response")).response.body_mutation.streamed_response for r in done]
            trailers = [r for r in sent if r.HasField("response_trailers")]
            return bool(sum(s.end_of_stream for s in streamed) + len(trailers) >= ends)

        async def read() -> pb.ProcessingRequest | None:
            message = next(incoming)
            if message is None:
                await wait_until(ended)
            return message

        async def write(response: pb.ProcessingResponse) -> None:
            sent.append(response)

        async def write_encoded(message: bytes, *more: bytes) -> None:
            nonlocal pieces_written
            pieces_written += 1
            sent.append(pb.ProcessingResponse.FromString(b"".join((message, *more))))

        await serve(StreamProcessor(Chain("c", plugins)), read, write, write_encoded if encoded else None)
        return sent, pieces_written

    plain, _ = asyncio.run(run(encoded=False))
    sent, pieces_written = asyncio.run(run(encoded=True))
    assert pieces_written > 0  # the encoded path was taken
    assert sent == plain


async def _serve_request_body(
    plugin: Plugin, chunks: list[bytes], write_encoded: Callable[..., Awaitable[None]]
) -> None:
    """A FULL_DUPLEX request body through `serve`, Envoy half-closing only once the body's end was sent."""
    messages = [_message("request_headers")]
    messages += [_message("request_body", body=c, end_of_stream=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    incoming = iter([*messages, None])
    ended = asyncio.Event()

    async def read() -> pb.ProcessingRequest | None:
        message = next(incoming)
        if message is None:
            await asyncio.wait_for(ended.wait(), 5)
        return message

    async def write(response: pb.ProcessingResponse) -> None:
        pass  # the headers answer

    async def write_encoded_then_watch(message: bytes, *more: bytes) -> None:
        await write_encoded(message, *more)
        response = pb.ProcessingResponse.FromString(b"".join((message, *more)))
        if response.request_body.response.body_mutation.streamed_response.end_of_stream:
            ended.set()

    await serve(StreamProcessor(Chain("c", [plugin])), read, write, write_encoded_then_watch)


def _streamed_bodies(written: list[bytes]) -> list[tuple[bytes, bool]]:
    responses = [pb.ProcessingResponse.FromString(message) for message in written]
    streamed = [response.request_body.response.body_mutation.streamed_response for response in responses]
    return [(s.body, s.end_of_stream) for s in streamed]


def test_full_duplex_outputs_waiting_together_go_to_envoy_as_one_message() -> None:
    """A hook yielding many small pieces from one chunk costs Envoy one message, not one per piece (Envoy
    parses, times and forwards each); the bytes, their order and the end of the body stay exact."""
    chunks = [random.Random(n).randbytes(size) for n, size in enumerate([30_000, 1, 250_000, 999])]
    written: list[bytes] = []

    async def write_encoded(message: bytes, *more: bytes) -> None:
        written.append(b"".join((message, *more)))

    asyncio.run(_serve_request_body(_Confetti(), chunks, write_encoded))
    bodies = _streamed_bodies(written)
    assert b"".join(body for body, _ in bodies) == b"".join(chunks)
    assert [end for _, end in bodies] == [False] * (len(bodies) - 1) + [True]
    pieces = sum(-(-len(c) // 100) for c in chunks)
    assert len(bodies) <= len(chunks) + 1 < pieces  # one message per input chunk at most, and the end


def test_full_duplex_an_output_goes_out_before_the_hook_yields_the_next() -> None:
    """Merging never waits for more: an output is sent while the hook is still busy with the next one."""
    sent_first = asyncio.Event()

    class Slow(Plugin):
        async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            async for chunk in chunks:
                yield chunk[:1]
                await asyncio.wait_for(sent_first.wait(), 5)  # would time out if the first waited for this
                yield chunk[1:]

    written: list[bytes] = []

    async def write_encoded(message: bytes, *more: bytes) -> None:
        written.append(b"".join((message, *more)))
        sent_first.set()

    asyncio.run(_serve_request_body(Slow(), [b"abc"], write_encoded))
    assert _streamed_bodies(written)[0] == (b"a", False)
    assert b"".join(body for body, _ in _streamed_bodies(written)) == b"abc"


def test_full_duplex_outputs_waiting_for_a_blocked_sender_are_bounded() -> None:
    """While a send waits (Envoy's window full, say), the hook may get ahead only by the outbox's bound
    (1 MiB, then one output more); then it waits too, and so does its input. No message exceeds 1 MiB
    unless one output alone does (it then goes alone)."""
    piece = 64 * 1024
    yielded = 0
    release = asyncio.Event()

    class Producer(Plugin):
        async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            nonlocal yielded
            async for chunk in chunks:
                for start in range(0, len(chunk), piece):
                    yielded += 1
                    yield chunk[start : start + piece]
            yield b"z" * (3 * 1024 * 1024)  # larger than the bound: goes as it is

    written: list[bytes] = []

    async def write_encoded(message: bytes, *more: bytes) -> None:
        if not written:
            # The first send blocks. It holds 1 MiB (16 outputs); the hook goes on until 1 MiB more waits,
            # puts one output more, and waits: 33 yielded, however long the loop runs meanwhile.
            await wait_until(lambda: yielded >= 33)
            for _ in range(200):
                await asyncio.sleep(0)  # turns of the loop for the hook to run ahead, were it unbounded
            assert yielded == 16 + 16 + 1
            release.set()
        written.append(b"".join((message, *more)))

    body = random.Random(7).randbytes(8 * 1024 * 1024)
    asyncio.run(_serve_request_body(Producer(), [body], write_encoded))
    assert release.is_set()
    bodies = _streamed_bodies(written)
    big = b"z" * (3 * 1024 * 1024)
    assert b"".join(b for b, _ in bodies) == body + big
    assert all(len(b) <= 1024 * 1024 or b == big for b, _ in bodies)


def test_full_duplex_tiny_outputs_waiting_for_a_blocked_sender_are_bounded_in_count() -> None:
    """One-byte outputs: the outbox's count bound (1,024) holds where its byte bound never would."""
    yielded = 0

    class Dust(Plugin):
        async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            nonlocal yielded
            async for chunk in chunks:
                for start in range(len(chunk)):
                    yielded += 1
                    yield chunk[start : start + 1]

    written: list[bytes] = []

    async def write_encoded(message: bytes, *more: bytes) -> None:
        if not written:  # the first send blocks: it holds 1,024 outputs, 1,024 more wait, one more is yielded
            await wait_until(lambda: yielded >= 2 * 1024 + 1)
            for _ in range(200):
                await asyncio.sleep(0)
            assert yielded == 2 * 1024 + 1
        written.append(b"".join((message, *more)))

    body = random.Random(3).randbytes(5_000)
    asyncio.run(_serve_request_body(Dust(), [body], write_encoded))
    bodies = _streamed_bodies(written)
    assert b"".join(b for b, _ in bodies) == body
    assert len(bodies) < 10 and all(len(b) <= 1024 for b, _ in bodies)


def test_full_duplex_a_send_that_fails_is_a_stream_failure_at_once() -> None:
    """The sender task's own failure (the connection went, a reset) ends the stream as a named stream failure,
    promptly, as a failed send did before outputs had their own task: not an internal error with a traceback."""
    sends = 0

    async def write_encoded(message: bytes, *more: bytes) -> None:
        nonlocal sends
        sends += 1
        if sends == 2:
            raise ConnectionResetError("peer went away")

    started = time.monotonic()
    with pytest.raises(StreamFailure, match="sending the body failed: ConnectionResetError"):
        asyncio.run(
            _serve_request_body(Doubler(), [b"a" * (1 << 20), b"b" * (1 << 20)], write_encoded)
        )  # 1 MiB: one a message
    assert sends == 2
    assert time.monotonic() - started < 2  # not the stream deadline
