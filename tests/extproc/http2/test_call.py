"""gRPC calls on the native transport: messages both ways, statuses, calls turned down, cancellation, bounds."""

from __future__ import annotations

import asyncio
import random
import struct
from collections import deque
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe import frame as hf

from sidecar.config import Limits
from sidecar.extproc.http2 import Call, Http2Server
from sidecar.extproc.http2.call import _frames
from sidecar.extproc.status import CallError, Status
from tests.support.h2peers import (
    DEADLINE,
    ECHO,
    echo,
    grpc_frame,
    h2_client,
    raw_client,
    request_frame,
    request_headers,
    serving,
)

pytestmark = pytest.mark.asyncio


async def test_grpcio_client_echoes_small_and_large_messages(tmp_path: Path) -> None:
    async with serving(tmp_path, {ECHO: echo}) as (_, path), grpc.aio.insecure_channel(f"unix:{path}") as channel:
        unary = channel.unary_unary(ECHO)
        for size in (0, 10, 16 * 1024 + 1, 200_000, 3 * 1024 * 1024):
            payload = random.Random(size).randbytes(size)
            assert await asyncio.wait_for(unary(payload), DEADLINE) == payload, size


async def test_bidi_stream_interleaves_and_half_close_ends_it(tmp_path: Path) -> None:
    read_none_after: list[int] = []

    async def handler(call: Call) -> None:
        count = 0
        while (message := await call.read()) is not None:
            count += 1
            await call.send(b"re:" + message)
        read_none_after.append(count)
        await call.send(b"bye")

    async with serving(tmp_path, {ECHO: handler}) as (_, path), h2_client(path) as client:
        sid = client.start()
        for i in range(5):
            client.send(sid, grpc_frame(b"m%d" % i))
            await client.until(lambda: len(client.body[sid]) == (i + 1) * len(grpc_frame(b"re:m0")))  # noqa: B023
            assert client.messages(sid)[-1] == b"re:m%d" % i
        assert not client.ended(sid)
        client.end(sid)
        headers = await client.finish(sid)
    assert client.messages(sid) == [b"re:m%d" % i for i in range(5)] + [b"bye"]
    assert read_none_after == [5]
    assert headers[b":status"] == b"200"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == b"0"


async def test_unknown_method_gets_a_trailers_only_unimplemented(tmp_path: Path) -> None:
    async with serving(tmp_path, {ECHO: echo}) as (_, path), h2_client(path) as client:
        sid = client.start("/test.Echo/Nope", end_stream=True)
        headers = await client.finish(sid)
        (response,) = client.seen(h2.events.ResponseReceived)
    assert response.stream_ended is not None  # status in the one and only HEADERS frame
    assert headers[b":status"] == b"200"
    assert headers[b"grpc-status"] == b"12"
    assert b"/test.Echo/Nope" in headers[b"grpc-message"]
    assert not client.seen(h2.events.DataReceived)


async def test_non_grpc_content_type_gets_415(tmp_path: Path) -> None:
    called: list[str] = []

    async def handler(call: Call) -> None:
        called.append(call.path)

    async with serving(tmp_path, {ECHO: handler}) as (_, path), h2_client(path) as client:
        sid = client.start(content_type=b"application/json")
        client.send(sid, b"{}")
        headers = await client.finish(sid)
        await client.ping_roundtrip()
    assert headers[b":status"] == b"415"
    assert b"grpc-status" not in headers
    assert called == []


async def test_compressed_and_oversized_messages_end_their_call_not_the_connection(tmp_path: Path) -> None:
    reads: list[bytes | memoryview | None] = []

    async def handler(call: Call) -> None:
        reads.append(await call.read())
        await call.read()

    routes = {"/t/Hold": handler, ECHO: echo}
    async with serving(tmp_path, routes, max_message=1000) as (_, path), h2_client(path) as client:
        compressed = client.start("/t/Hold")
        client.send(compressed, grpc_frame(b"zz", compressed=True))
        oversized = client.start("/t/Hold")
        client.send(oversized, struct.pack(">BI", 0, 1001))  # the prefix is enough to refuse it
        statuses = [await client.finish(sid) for sid in (compressed, oversized)]
        messages, headers = await client.call(ECHO, b"x" * 1000)  # at the limit: fine
    assert [s[b"grpc-status"] for s in statuses] == [b"13", b"8"]
    assert reads == []  # neither handler saw a message
    assert messages == [b"x" * 1000]
    assert headers[b"grpc-status"] == b"0"


@pytest.mark.parametrize("ending", ["DATA", "trailers"])
async def test_a_request_ending_inside_a_message_gets_internal(tmp_path: Path, ending: str) -> None:
    async with serving(tmp_path, {ECHO: echo}) as (_, path), raw_client(path) as raw:
        truncated = grpc_frame(b"truncated")[:7]
        if ending == "DATA":
            raw.send(request_frame(raw), hf.DataFrame(1, truncated, flags=["END_STREAM"]))
        else:
            trailers = hf.HeadersFrame(1, raw.block([(b"x-trailer", b"1")]), flags=["END_HEADERS", "END_STREAM"])
            raw.send(request_frame(raw), hf.DataFrame(1, truncated), trailers)
        headers = await raw.finish(1)
    assert headers[b"grpc-status"] == b"13"
    assert raw.messages(1) == []


async def test_client_reset_cancels_the_handler(tmp_path: Path) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(call: Call) -> None:
        started.set()
        try:
            await call.read()
            await call.read()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    routes = {"/t/Hold": handler, ECHO: echo}
    async with serving(tmp_path, routes) as (server, path), h2_client(path) as client:
        sid = client.start("/t/Hold")
        client.send(sid, grpc_frame(b"first"))
        await asyncio.wait_for(started.wait(), DEADLINE)
        client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        await asyncio.wait_for(cancelled.wait(), DEADLINE)
        messages, headers = await client.call(ECHO, b"next")
        assert not any(conn.streams for conn in server.connections)
    assert messages == [b"next"]
    assert headers[b"grpc-status"] == b"0"
    assert client.headers(sid) == {}  # nothing is sent on a stream the client reset


async def test_handler_errors_become_statuses(tmp_path: Path) -> None:
    async def boom(call: Call) -> None:
        raise RuntimeError("secret detail")

    async def missing(call: Call) -> None:
        raise CallError(Status.NOT_FOUND, "x")

    async def odd(call: Call) -> None:
        await call.send(b"partial answer")
        raise CallError(Status.INVALID_ARGUMENT, "café 100%\n")

    routes = {"/t/Boom": boom, "/t/Missing": missing, "/t/Odd": odd}
    async with serving(tmp_path, routes) as (_, path):
        async with h2_client(path) as client:
            (_, boom_status), (_, missing_status), (odd_messages, odd_status) = [
                await client.call(name, b"") for name in routes
            ]
        assert (boom_status[b"grpc-status"], boom_status[b"grpc-message"]) == (b"13", b"internal error")
        assert b"secret" not in client.received_bytes
        assert (missing_status[b"grpc-status"], missing_status[b"grpc-message"]) == (b"5", b"x")
        assert odd_messages == [b"partial answer"]
        assert (odd_status[b"grpc-status"], odd_status[b"grpc-message"]) == (b"3", b"caf%C3%A9 100%25%0A")

        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:  # and a gRPC client decodes it
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(channel.unary_unary("/t/Odd")(b""), DEADLINE)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failed.value.details() == "café 100%\n"


async def test_a_send_cut_short_resets_the_stream_instead_of_ending_it(tmp_path: Path) -> None:
    tasks: list[asyncio.Task[Any]] = []

    async def big_answer(call: Call) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        await call.send(b"x" * 5000)

    async with serving(tmp_path, {ECHO: big_answer}) as (_, path), raw_client(path) as raw:
        raw.send(hf.SettingsFrame(0, settings={hf.SettingsFrame.INITIAL_WINDOW_SIZE: 1000}), request_frame(raw))
        await raw.until(lambda: sum(len(f.data) for f in raw.of(hf.DataFrame, 1)) == 1000)
        tasks[0].cancel()
        await raw.until(lambda: raw.ended(1))
        (reset,) = raw.of(hf.RstStreamFrame, 1)
        assert reset.error_code == 0x8  # CANCEL
        assert b"grpc-status" not in raw.headers(1)  # no status after a cut message: it would read as valid


async def test_the_connection_buffer_budget_ends_the_biggest_call(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def never_reads(call: Call) -> None:
        await release.wait()

    server = Http2Server({ECHO: never_reads}, max_message=64 * 1024, limits=Limits(connection_receive_buffer=100_000))
    path = str(tmp_path / "h2.sock")
    server.add_listener(await asyncio.get_running_loop().create_unix_server(server.protocol, path=path))
    try:
        async with raw_client(path) as raw:
            first = request_frame(raw)  # HPACK blocks are encoded in the order they are sent
            raw.send(first, hf.HeadersFrame(3, raw.block(request_headers()), flags=["END_HEADERS"]))
            raw.send(hf.DataFrame(1, grpc_frame(b"a" * 64_000)), hf.DataFrame(3, grpc_frame(b"b" * 20_000)))
            raw.send(hf.DataFrame(3, grpc_frame(b"c" * 20_000)))  # now over the budget
            headers = await raw.finish(1)
            assert headers[b"grpc-status"] == b"8"
            assert not raw.ended(3)  # the smaller call goes on
            release.set()
            assert (await raw.finish(3))[b"grpc-status"] == b"0"
    finally:
        await server.stop(0)


async def test_data_frames_cut_from_pieces_are_exact_at_every_edge() -> None:
    """`_frames` cuts what `Call.send` writes (a message's prefix, header and body pieces, views of the
    caller's bytes) into DATA frames of at most the peer's frame size, part of it at a time when flow
    control allows only part: end to end the frames carry exactly the pieces, none longer than allowed."""
    rng = random.Random(17)
    for _ in range(300):
        sizes = [0, 1, 5, 100, 999] if rng.random() < 0.3 else [0, 1, 5, 16_383, 16_384, 16_385, 70_000]
        pieces = [rng.randbytes(rng.choice(sizes)) for _ in range(4)]
        data = b"".join(pieces)
        max_frame = rng.choice([1, 7, 16_384] if len(data) < 5_000 else [16_384, 16_385, 1024 * 1024])
        parts = deque(memoryview(piece) for piece in pieces if piece)
        frames: list[tuple[int, bytes]] = []
        left = len(data)
        while left:
            allowed = min(left, rng.choice([1, 999, 16_384, 65_535, len(data)]))  # what the windows allow
            out: list[bytes | memoryview] = []
            _frames(parts, allowed, 5, max_frame, out)
            left -= allowed
            wire = b"".join(out)
            while wire:
                length, kind, flags, stream_id = *struct.unpack(">I", b"\0" + wire[:3]), wire[3], wire[4], wire[5:9]
                assert (kind, flags, int.from_bytes(stream_id)) == (0, 0, 5)
                assert 0 < length <= max_frame
                frames.append((length, wire[9 : 9 + length]))
                wire = wire[9 + length :]
        assert not parts
        assert b"".join(payload for _, payload in frames) == data
