"""The HTTP/2 connection: frames in (padding, CONTINUATION, any split), connection errors, PING, fuzzing."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hyperframe import frame as hf

from sidecar.extproc.http2 import Call, Http2Server
from sidecar.extproc.http2.connection import UNIX_SEND_BUFFER, _widen_send_buffer
from sidecar.extproc.http2.frames import MAX_FRAME, PREFACE
from tests.support.h2peers import (
    DEADLINE,
    ECHO,
    GOAWAY,
    PING,
    RawClient,
    assert_serves,
    echo,
    feed,
    frame_kinds,
    grpc_frame,
    grpc_messages,
    h2_client,
    parse_frames,
    random_splits,
    raw_client,
    raw_frame,
    request_frame,
    request_headers,
    serving,
    settle,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.asyncio


async def test_padding_on_headers_and_data_is_accepted(tmp_path: Path) -> None:
    message = grpc_frame(b"padded")
    async with serving(tmp_path, {ECHO: echo}) as (_, path):
        async with raw_client(path) as raw:
            raw.send(
                hf.HeadersFrame(
                    1,
                    raw.block(request_headers()),
                    flags=["END_HEADERS", "PADDED", "PRIORITY"],
                    pad_length=17,
                    depends_on=0,
                    stream_weight=15,
                ),
                hf.DataFrame(1, message[:3], flags=["PADDED"], pad_length=255),  # the message spans padded frames
                hf.DataFrame(1, message[3:], flags=["PADDED", "END_STREAM"], pad_length=0),
            )
            headers = await raw.finish(1)
        assert raw.messages(1) == [b"padded"]
        assert headers[b"grpc-status"] == b"0"

        async with h2_client(path) as client:  # h2's own padding of DATA frames
            sid = client.start()
            client.send(sid, grpc_frame(b"one"), pad_length=200)
            client.send(sid, grpc_frame(b"two"), pad_length=1, end_stream=True)
            headers = await client.finish(sid)
        assert client.messages(sid) == [b"one", b"two"]
        assert headers[b"grpc-status"] == b"0"


async def test_header_block_split_over_continuation_frames(tmp_path: Path) -> None:
    async def handler(call: Call) -> None:
        await call.send(call.metadata["x-long"].encode())

    value = b"".join(b"%04d," % i for i in range(800))
    async with serving(tmp_path, {ECHO: handler}) as (_, path), raw_client(path) as raw:
        block = raw.block(request_headers(extra=[(b"x-long", value)]))
        raw.send(
            hf.HeadersFrame(1, block[:7]),  # cuts through the middle of a header field
            hf.ContinuationFrame(1, block[7:1000]),
            hf.ContinuationFrame(1, block[1000:], flags=["END_HEADERS"]),
            hf.DataFrame(1, grpc_frame(b""), flags=["END_STREAM"]),
        )
        headers = await raw.finish(1)
    assert raw.messages(1) == [value]
    assert headers[b"grpc-status"] == b"0"


async def test_bad_preface_closes_the_connection(tmp_path: Path) -> None:
    async with serving(tmp_path, {ECHO: echo}) as (_, path):
        async with raw_client(path, preface=False) as raw:
            raw.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            await raw.read_to_eof()
        assert not raw.of(hf.HeadersFrame)
        await assert_serves(path)


CONNECTION_ERRORS: dict[str, tuple[Callable[[RawClient], bytes], int]] = {
    "bad HPACK index": (lambda raw: hf.HeadersFrame(1, b"\xbe", flags=["END_HEADERS"]).serialize(), 0x9),
    "DATA on an idle stream": (lambda raw: hf.DataFrame(1, grpc_frame(b"x")).serialize(), 0x1),
    "frame over MAX_FRAME_SIZE": (
        lambda raw: struct.pack(">IBI", (MAX_FRAME + 1) << 8 | 0x0, 0, 1),  # the header alone suffices
        0x6,
    ),
    "HEADERS interrupted before END_HEADERS": (
        lambda raw: hf.HeadersFrame(1, raw.block(request_headers())).serialize() + raw_frame(PING, 0, 0, b"8 bytes!"),
        0x1,
    ),
    "PING of the wrong size": (lambda raw: struct.pack(">IBI", 4 << 8 | PING, 0, 0) + b"four", 0x1),
    "SETTINGS with too many entries": (lambda raw: raw_frame(0x4, 0, 0, struct.pack(">HI", 0x99, 1) * 65), 0xB),
    "a header block over 64 KiB in one frame": (
        lambda raw: raw_frame(0x1, 0x4, 1, raw.block(request_headers(extra=[(b"x-big", b"a" * 70_000)]))),
        0xB,
    ),
}


@pytest.mark.parametrize("case", CONNECTION_ERRORS)
async def test_connection_errors_end_with_goaway(tmp_path: Path, case: str) -> None:
    build, code = CONNECTION_ERRORS[case]
    async with serving(tmp_path, {ECHO: echo}) as (_, path):
        async with raw_client(path) as raw:
            raw.write(build(raw))
            await raw.read_to_eof()
        (goaway,) = raw.of(hf.GoAwayFrame)
        assert goaway.error_code == code
        assert goaway.last_stream_id == 0
        await assert_serves(path)


async def test_ping_is_acknowledged_with_its_payload(tmp_path: Path) -> None:
    async with serving(tmp_path, {ECHO: echo}) as (_, path), h2_client(path) as client:
        client.h2.ping(b"\x00\xffping!!")
        client.flush()
        await client.until(lambda: bool(client.seen(h2.events.PingAckReceived)))
        (ack,) = client.seen(h2.events.PingAckReceived)
    assert ack.ping_data == b"\x00\xffping!!"


def random_frames(rng: random.Random, encoder: hpack.Encoder) -> bytes:
    out = bytearray()
    for _ in range(rng.randint(1, 5)):
        roll = rng.random()
        stream_id = rng.choice([0, 1, 1, 3, 3, 2, 5, rng.getrandbits(32)])
        if roll < 0.3:  # a well-formed request, sometimes half-closed at once
            out += raw_frame(0x1, 0x4 | rng.choice([0, 1]), stream_id | 1, encoder.encode(request_headers()))
        elif roll < 0.6:  # DATA with (a piece of) a gRPC message
            message = grpc_frame(rng.randbytes(rng.randint(0, 20)), compressed=rng.random() < 0.1)
            out += raw_frame(0x0, rng.choice([0, 1]), stream_id, message[: rng.randint(0, len(message))])
        else:  # any frame type, flags and body
            kind = rng.choice([*range(10), 0xA, 0xFE])
            size = rng.choice([0, 1, 4, 5, 6, 8, 12, rng.randint(0, 40)])
            out += raw_frame(kind, rng.getrandbits(8), stream_id, rng.randbytes(size))
    return bytes(out)


async def test_fuzzed_input_never_escapes_data_received() -> None:
    rng = random.Random(20_240_601)
    server = Http2Server({ECHO: echo}, max_message=64)
    outcomes: dict[str, int] = defaultdict(int)
    for _ in range(500):
        if rng.random() < 0.2:  # nothing but noise after the preface and SETTINGS
            garbage, body = True, rng.randbytes(rng.randint(1, 200))
        else:  # frames of random types, flags and bodies, sometimes followed by noise
            garbage = rng.random() < 0.3
            body = random_frames(rng, hpack.Encoder()) + (rng.randbytes(rng.randint(1, 64)) if garbage else b"")
        data = PREFACE + raw_frame(0x4, 0, 0) + body
        conn, transport = await feed(server, random_splits(rng, data))
        if not transport.closing and not garbage:  # still in step with the client: still answering
            conn.data_received(raw_frame(PING, 0, 0, b"liveness"))
        kinds = [type(f) for f in parse_frames(bytes(transport.out))]
        if transport.closing:
            assert hf.GoAwayFrame in kinds or GOAWAY in frame_kinds(data), data
            outcomes["closed"] += 1
        else:
            alive = bytes(hf.PingFrame(0, b"liveness", flags=["ACK"]).serialize()) in transport.out
            assert garbage or alive, data
            outcomes["alive"] += 1
        await settle(conn, transport)
    assert min(outcomes.values()) > 50 and len(outcomes) == 2  # both outcomes were exercised


def valid_client_stream() -> bytes:
    encoder = hpack.Encoder()
    first = encoder.encode(request_headers(extra=[(b"x-tag", b"a" * 40)]))
    second = encoder.encode(request_headers(extra=[(b"x-tag", b"a" * 40)]))  # indexed from the dynamic table
    frames: list[hf.Frame] = [
        hf.SettingsFrame(0, settings={hf.SettingsFrame.INITIAL_WINDOW_SIZE: 100_000}),
        hf.HeadersFrame(1, first, flags=["END_HEADERS"]),
        hf.DataFrame(1, grpc_frame(b"hello") + grpc_frame(b"")[:2], flags=["PADDED"], pad_length=3),
        hf.DataFrame(1, grpc_frame(b"")[2:], flags=["END_STREAM"]),
        hf.PingFrame(0, b"abcdefgh"),
        hf.HeadersFrame(3, second[:5]),
        hf.ContinuationFrame(3, second[5:], flags=["END_HEADERS"]),
        hf.DataFrame(3, grpc_frame(b"x" * 30), flags=["END_STREAM"]),
        hf.WindowUpdateFrame(0, 1000),
        hf.SettingsFrame(0, flags=["ACK"]),
    ]
    return PREFACE + b"".join(frame.serialize() for frame in frames)


async def test_split_points_do_not_change_the_outcome() -> None:
    server = Http2Server({ECHO: echo}, max_message=64)
    data = valid_client_stream()

    async def outcome(chunks: list[bytes]) -> bytes:
        conn, transport = await feed(server, chunks)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        await asyncio.wait_for(asyncio.gather(*others), DEADLINE)  # both calls complete
        assert not transport.closing
        await settle(conn, transport)
        return bytes(transport.out)

    baseline = await outcome([data])
    frames = parse_frames(baseline)
    data_frames = [f for f in frames if isinstance(f, hf.DataFrame)]
    assert grpc_messages(b"".join(f.data for f in data_frames if f.stream_id == 1)) == [b"hello", b""]
    assert grpc_messages(b"".join(f.data for f in data_frames if f.stream_id == 3)) == [b"x" * 30]
    assert sum("END_STREAM" in f.flags for f in frames if isinstance(f, hf.HeadersFrame)) == 2
    assert any(isinstance(f, hf.PingFrame) and f.opaque_data == b"abcdefgh" for f in frames)
    for cut in range(1, len(data)):
        assert await outcome([data[:cut], data[cut:]]) == baseline, cut
    assert await outcome([data[i : i + 1] for i in range(len(data))]) == baseline


async def test_the_last_stream_id_in_goaway_never_goes_up(tmp_path: Path) -> None:
    started = asyncio.Event()

    async def waits(call: Call) -> None:
        started.set()
        await asyncio.Event().wait()

    async with serving(tmp_path, {ECHO: waits}) as (server, path), raw_client(path) as raw:
        raw.send(request_frame(raw))
        await asyncio.wait_for(started.wait(), DEADLINE)
        stopping = asyncio.create_task(server.stop(grace=5))
        await raw.until(lambda: len(raw.of(hf.GoAwayFrame)) == 2)  # the first, then the final after the PING ack
        raw.send(hf.HeadersFrame(3, raw.block(request_headers()), flags=["END_HEADERS"]))  # not served
        raw.write(struct.pack(">IBI", 4 << 8 | PING, 0, 0) + b"four")  # a connection error
        await raw.read_to_eof()
        await asyncio.wait_for(stopping, DEADLINE)
    assert [g.last_stream_id for g in raw.of(hf.GoAwayFrame)] == [2**31 - 1, 1, 1]


async def test_a_frame_trickled_byte_by_byte_costs_its_bytes_not_an_object_per_read() -> None:
    """A peer may deliver a large frame one byte per read. What waits for the rest of the frame is held as
    bytes, not as one object per read (a list of 1-byte pieces would cost tens of bytes for each byte)."""
    server = Http2Server({ECHO: echo}, max_message=1024 * 1024)
    encoder = hpack.Encoder()
    opening = PREFACE + raw_frame(0x4, 0, 0) + raw_frame(0x1, 0x4, 1, encoder.encode(request_headers()))
    conn, transport = await feed(server, [opening])
    frame = raw_frame(0x0, 0, 1, grpc_frame(b"t" * 60_000))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for byte in range(len(frame) - 1):
            conn.data_received(frame[byte : byte + 1])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * len(frame)  # the frame's bytes and the bytearray's slack, nothing per read
    conn.data_received(frame[-1:])
    assert list(conn.streams[1]._messages) == [b"t" * 60_000]
    await settle(conn, transport)


def _wmem_max() -> int:
    return int(Path("/proc/sys/net/core/wmem_max").read_text())


async def test_a_unix_socket_connection_asks_for_a_send_buffer_that_holds_a_whole_answer(tmp_path: Path) -> None:
    async with serving(tmp_path, {ECHO: echo}) as (server, path), raw_client(path):
        await wait_until(lambda: len(server.connections) == 1)
        (conn,) = server.connections
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        # Linux doubles what it is asked for (its bookkeeping), up to net.core.wmem_max.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * min(UNIX_SEND_BUFFER, _wmem_max())


async def test_a_tcp_socket_keeps_the_kernels_own_send_buffer_tuning() -> None:
    """Setting SO_SNDBUF on TCP would turn the kernel's autotuning off: only Unix sockets get it."""

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def get_extra_info(self, name: str) -> socket.socket:
            return self.sock

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, socket.socket(socket.AF_UNIX) as unix:
        before = tcp.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        _widen_send_buffer(Transport(tcp))  # type: ignore[arg-type]
        _widen_send_buffer(Transport(unix))  # type: ignore[arg-type]
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == before
        assert unix.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * min(UNIX_SEND_BUFFER, _wmem_max())

    class Refusing:
        family = socket.AF_UNIX

        def setsockopt(self, *args: object) -> None:
            raise PermissionError("not allowed here")

    _widen_send_buffer(Transport(Refusing()))  # type: ignore[arg-type]  # a tuning: refused, nothing else changes


@pytest.mark.skipif(_wmem_max() < UNIX_SEND_BUFFER, reason="net.core.wmem_max caps SO_SNDBUF below a whole answer")
async def test_a_1_mib_answer_goes_to_the_kernel_at_once_and_reading_from_the_peer_goes_on(tmp_path: Path) -> None:
    """Envoy's body chunks are 1 MiB. A FULL_DUPLEX answer of that size is handed to the kernel in one write
    while the peer has not read any of it yet: nothing waits in the event loop's queue, so the connection is
    not paused (before, it stopped reading the next chunk from Envoy until Envoy had read this answer)."""
    sent = asyncio.Event()

    async def answer(call: Call) -> None:
        await call.send(b"a" * (1024 * 1024))
        sent.set()
        await call.read()

    async with serving(tmp_path, {ECHO: answer}) as (server, path), raw_client(path) as raw:
        window = 16 * 1024 * 1024  # what Envoy advertises
        raw.send(hf.SettingsFrame(0, settings={hf.SettingsFrame.INITIAL_WINDOW_SIZE: window}))
        raw.send(hf.WindowUpdateFrame(0, window), request_frame(raw))
        await asyncio.wait_for(sent.wait(), DEADLINE)
        (conn,) = server.connections
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() == 0
        assert conn.writable
        raw.send(hf.DataFrame(1, grpc_frame(b"done"), flags=["END_STREAM"]))
        await raw.finish(1)
    assert raw.messages(1) == [b"a" * (1024 * 1024)]
