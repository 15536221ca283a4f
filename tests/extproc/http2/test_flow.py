"""HTTP/2 flow control in both directions, per stream and per connection."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest

from sidecar.extproc.http2 import Call, Http2Server
from sidecar.extproc.http2.call import MESSAGE_COST
from sidecar.extproc.http2.frames import PREFACE, STREAM_WINDOW
from sidecar.extproc.http2.limits import CALL_COST
from tests.support.h2peers import (
    ECHO,
    echo,
    feed,
    grpc_frame,
    h2_client,
    random_splits,
    raw_frame,
    request_headers,
    serving,
    settle,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.asyncio


async def test_inbound_flow_control_holds_the_client_back_until_the_handler_reads(tmp_path: Path) -> None:
    go = asyncio.Event()
    received: list[bytes | memoryview] = []

    async def handler(call: Call) -> None:
        await go.wait()
        while (message := await call.read()) is not None:
            received.append(message)
        await call.send(b"%d" % len(received))

    messages = [bytes([i]) * (64 * 1024 - 5) for i in range(24)]  # 1.5 stream windows of 64 KiB frames
    pending = b"".join(grpc_frame(m) for m in messages)
    async with serving(tmp_path, {ECHO: handler}) as (_, path), h2_client(path) as client:
        sid = client.start()
        pending = client.send_what_fits(sid, pending)
        assert len(pending) == len(messages) * 64 * 1024 - STREAM_WINDOW
        await client.ping_roundtrip()  # the server has seen every byte: no credit came back for them
        assert client.h2.local_flow_control_window(sid) == 0
        assert not client.seen(h2.events.WindowUpdated, lambda e: e.stream_id == sid)
        assert received == []

        go.set()  # the handler consumes what is buffered: credit returns, the rest can go
        await client.until(lambda: client.h2.local_flow_control_window(sid) > 0)
        credit = client.seen(h2.events.WindowUpdated, lambda e: e.stream_id == sid)
        pending = client.send_what_fits(sid, pending[: 64 * 1024]) + pending[64 * 1024 :]
        await wait_until(lambda: len(received) == 17)
        await client.ping_roundtrip()  # one message read: too little credit owed to be worth a WINDOW_UPDATE
        assert client.seen(h2.events.WindowUpdated, lambda e: e.stream_id == sid) == credit
        while pending:
            await client.until(lambda: client.h2.local_flow_control_window(sid) > 0)
            pending = client.send_what_fits(sid, pending)
        client.end(sid)
        headers = await client.finish(sid)
    credit = [e.delta for e in client.seen(h2.events.WindowUpdated, lambda e: e.stream_id == sid)]
    assert credit and min(credit) >= STREAM_WINDOW // 2  # returned in large steps, not per frame
    assert received == messages
    assert client.messages(sid) == [b"24"]
    assert headers[b"grpc-status"] == b"0"


async def test_outbound_flow_control_respects_a_tiny_stream_window(tmp_path: Path) -> None:
    payload = random.Random(4).randbytes(10 * 1024)

    async def handler(call: Call) -> None:
        await call.send(payload)

    settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100}
    async with serving(tmp_path, {ECHO: handler}) as (_, path), h2_client(path, settings) as client:
        client.auto_ack = False
        sid = client.start(end_stream=True)
        await client.until(lambda: len(client.body[sid]) >= 100)
        await client.ping_roundtrip()
        assert len(client.body[sid]) == 100  # h2 itself raises if the server overruns the window
        client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 300})
        client.flush()
        await client.until(lambda: len(client.body[sid]) >= 300)
        await client.ping_roundtrip()
        assert len(client.body[sid]) == 300  # a new initial window applies to open streams as a delta
        granted = 300
        while not client.ended(sid):
            client.h2.increment_flow_control_window(100, stream_id=sid)
            client.flush()
            granted += 100
            await client.until(lambda: client.ended(sid) or len(client.body[sid]) == granted)  # noqa: B023
        headers = client.headers(sid)
    sizes = [e.flow_controlled_length for e in client.seen(h2.events.DataReceived)]
    assert sizes[:2] == [100, 200] and max(sizes[2:]) == 100
    assert client.messages(sid) == [payload]
    assert headers[b"grpc-status"] == b"0"


async def test_outbound_flow_control_respects_the_connection_window(tmp_path: Path) -> None:
    payload = random.Random(5).randbytes(100_000)

    async def handler(call: Call) -> None:
        await call.send(payload)

    settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024 * 1024}
    async with serving(tmp_path, {ECHO: handler}) as (_, path), h2_client(path, settings) as client:
        client.auto_ack = False  # the connection window stays at the initial 65,535 bytes
        sid = client.start(end_stream=True)
        await client.until(lambda: len(client.body[sid]) >= 65_535)
        await client.ping_roundtrip()
        assert len(client.body[sid]) == 65_535
        assert all(e.flow_controlled_length <= 16_384 for e in client.seen(h2.events.DataReceived))  # MAX_FRAME
        client.h2.increment_flow_control_window(65_535)
        client.flush()
        headers = await client.finish(sid)
    assert client.messages(sid) == [payload]
    assert headers[b"grpc-status"] == b"0"


@pytest.mark.parametrize(
    ("window", "max_frame"), [(65_535, 16_384), (1_000, 16_384), (777, 16_384), (4 * 1024 * 1024, 1024 * 1024)]
)
async def test_a_message_sent_in_pieces_arrives_whole_whatever_the_windows_and_frames(
    tmp_path: Path, window: int, max_frame: int
) -> None:
    """`Call.send(message, *more)` frames views of the pieces: frame and window boundaries fall anywhere inside
    them (and on their edges), empty pieces included, and the peer still reads the pieces end to end."""
    rng = random.Random(window)
    sizes = [0, 1, 5, 16_379, 16_384, 16_385, 100_000, 300_000]
    answers = [[rng.randbytes(size) for size in rng.sample(sizes, rng.randint(1, 4))] for _ in range(6)]
    answers += [[b"", b"", b"x"], [rng.randbytes(20_000)], [b"a", rng.randbytes(2 * 1024 * 1024), b"", b"z"]]

    async def handler(call: Call) -> None:
        for pieces in answers:
            await call.send(*pieces)

    codes = h2.settings.SettingCodes
    settings = {codes.INITIAL_WINDOW_SIZE: window, codes.MAX_FRAME_SIZE: max_frame}
    async with serving(tmp_path, {ECHO: handler}) as (_, path), h2_client(path, settings) as client:
        client.h2.increment_flow_control_window(16 * 1024 * 1024)  # the connection window is not under test here
        client.h2.max_inbound_frame_size = max_frame  # h2 applies its own setting only once acknowledged
        sid = client.start(end_stream=True)
        headers = await client.finish(sid)
    frames = [e.flow_controlled_length for e in client.seen(h2.events.DataReceived)]
    assert max(frames) <= min(window, max_frame)
    assert client.messages(sid) == [b"".join(pieces) for pieces in answers]
    assert headers[b"grpc-status"] == b"0"


async def test_resetting_a_flow_blocked_call_leaves_the_others_alone(tmp_path: Path) -> None:
    payload = b"x" * 1000
    cancelled: list[int] = []

    async def handler(call: Call) -> None:
        try:
            await call.send(payload)
        except asyncio.CancelledError:
            cancelled.append(call.stream_id)
            raise

    settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10}
    async with serving(tmp_path, {ECHO: handler}) as (_, path), h2_client(path, settings) as client:
        client.auto_ack = False
        first, second = client.start(end_stream=True), client.start(end_stream=True)
        await client.until(lambda: len(client.body[first]) == len(client.body[second]) == 10)  # both blocked
        client.h2.reset_stream(first)
        client.flush()
        await wait_until(lambda: first in cancelled)
        await client.ping_roundtrip()
        assert cancelled == [first]
        assert not client.ended(second), client.headers(second)

        third = client.start(end_stream=True)  # a call that blocks after the reset waits too
        await client.until(lambda: len(client.body[third]) == 10)
        await client.ping_roundtrip()
        assert not client.ended(third), client.headers(third)

        for sid in (second, third):
            client.h2.increment_flow_control_window(len(payload), stream_id=sid)
        client.flush()
        status = [(await client.finish(sid))[b"grpc-status"] for sid in (second, third)]
    assert status == [b"0", b"0"]
    assert client.messages(second) == client.messages(third) == [payload]
    assert cancelled == [first]


async def test_empty_data_frames_cost_nothing() -> None:
    server = Http2Server({ECHO: echo}, max_message=64)
    encoder = hpack.Encoder()
    opening = raw_frame(0x1, 0x4, 1, encoder.encode(request_headers())) + raw_frame(0x0, 0, 1, b"\0\0\0")
    # Up to limits.max_empty_frames in a row (past it the connection ends: tests/extproc/http2/test_attacks.py).
    empty = raw_frame(0x0, 0, 1) * server.limits.max_empty_frames
    conn, transport = await feed(server, [PREFACE + raw_frame(0x4, 0, 0) + opening, empty])
    call = conn.streams[1]
    assert conn.buffered == 3 + CALL_COST and call._partial == b"\0\0\0"
    assert not transport.closing
    await settle(conn, transport)


async def test_a_peer_that_stops_reading_stops_being_read() -> None:
    server = Http2Server({ECHO: echo}, max_message=64)
    conn, transport = await feed(server, [PREFACE + raw_frame(0x4, 0, 0)])
    conn.pause_writing()
    assert transport.reading is False
    conn.resume_writing()
    assert transport.reading is True
    await settle(conn, transport)


def _data_frames(stream_id: int, data: bytes, size: int = 16_384) -> bytes:
    return b"".join(raw_frame(0x0, 0, stream_id, data[i : i + size]) for i in range(0, len(data), size))


@pytest.mark.parametrize("reads", ["one read", "random reads"])
async def test_what_a_call_keeps_of_a_read_is_a_copy_or_counted(reads: str) -> None:
    """Frames are parsed as views of the socket's reads, and a call keeps copies: of a small message in a big
    read, of the start of a message, of a large message with much of the next one behind it. Only a large
    message assembled over many frames is handed on as a view of the buffer it was assembled in."""
    server = Http2Server({ECHO: echo}, max_message=1024 * 1024)
    encoder = hpack.Encoder()

    def stream(stream_id: int, data: bytes) -> bytes:
        return raw_frame(0x1, 0x4, stream_id, encoder.encode(request_headers())) + _data_frames(stream_id, data)

    small, large, following = b"s" * 10, random.Random(7).randbytes(100_000), grpc_frame(b"n" * 40_000)
    wire = (
        PREFACE
        + raw_frame(0x4, 0, 0)
        + stream(1, grpc_frame(small) + grpc_frame(large)[:7_000])  # a small message, then a message's start
        + stream(3, grpc_frame(large))  # one large message over 7 frames, the last ending with it
        + stream(5, grpc_frame(large) + following[:30_000])  # the last frame of the message has 14,683 more
    )
    chunks = [wire] if reads == "one read" else random_splits(random.Random(3), wire)
    conn, transport = await feed(server, chunks)  # the handlers have not run yet: everything is still held
    one, three, five = (conn.streams[stream_id] for stream_id in (1, 3, 5))
    assert list(one._messages) == [small] and type(one._messages[0]) is bytes
    assert one._partial == grpc_frame(large)[:7_000]
    assert list(three._messages) == [large] and type(three._messages[0]) is memoryview
    assert not three._partial
    assert list(five._messages) == [large] and type(five._messages[0]) is bytes  # too much behind it: copied
    assert five._partial == following[:30_000]
    messages = len(small) + 2 * len(large) + 3 * MESSAGE_COST
    assert conn.buffered == messages + 7_000 + 30_000 + 3 * CALL_COST  # what each call holds, counted once
    await settle(conn, transport)
