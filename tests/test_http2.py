"""Protocol-level tests of `sidecar.extproc.http2`, driven by independent HTTP/2 peers.

`h2` (python-hyper) is the main client: its own state machine and flow-control bookkeeping check what the
server sends. Frames h2 will not produce (padded or split header blocks, protocol violations, a client
that keeps talking after GOAWAY) are hand-made with `hyperframe` and `hpack`. grpcio's client checks
interop with a standard gRPC stack. The fuzz tests feed a `Connection` through a fake transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hyperframe import frame as hf

from sidecar.extproc.http2 import Call, Handler, Http2Server
from sidecar.extproc.http2.connection import Connection
from sidecar.extproc.http2.frames import MAX_FRAME, PREFACE, STREAM_WINDOW
from sidecar.extproc.status import CallError, Status

pytestmark = pytest.mark.asyncio

DEADLINE = 5.0
ECHO = "/test.Echo/Echo"
GOAWAY, PING = 0x7, 0x6
Headers = dict[bytes, bytes]


async def echo(call: Call) -> None:
    while (message := await call.read()) is not None:
        await call.send(message)


def grpc_frame(payload: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", compressed, len(payload)) + payload


def grpc_messages(data: bytes) -> list[bytes]:
    messages, position = [], 0
    while position < len(data):
        compressed, length = struct.unpack_from(">BI", data, position)
        assert compressed == 0
        messages.append(data[position + 5 : position + 5 + length])
        position += 5 + length
    assert position == len(data), "a message was cut short"
    return messages


def request_headers(
    path: str = ECHO, content_type: bytes = b"application/grpc", extra: Iterable[tuple[bytes, bytes]] = ()
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"test"),
        (b"content-type", content_type),
        (b"te", b"trailers"),
        *extra,
    ]


async def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll a condition the test cannot await directly (server state), with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)


async def read_some(reader: asyncio.StreamReader) -> bytes:
    """The next bytes from the server; b"" once it closed (a reset counts: replies can race its close)."""
    try:
        return await reader.read(1 << 16)
    except ConnectionError:
        return b""


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, routes: Mapping[str, Handler], *, max_message: int = 4 * 1024 * 1024
) -> AsyncIterator[tuple[Http2Server, str]]:
    server = Http2Server(routes, max_message=max_message)
    path = str(tmp_path / "h2.sock")
    server.add_listener(await asyncio.get_running_loop().create_unix_server(server.protocol, path=path))
    try:
        yield server, path
    finally:
        await server.stop(0)
        await wait_until(lambda: not server.connections)


# -- an h2 client -----------------------------------------------------------------------------------


class H2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: h2.connection.H2Connection):
        self.reader, self.writer, self.h2 = reader, writer, conn
        self.events: list[h2.events.Event] = []
        self.body: dict[int, bytearray] = defaultdict(bytearray)
        self.received_bytes = bytearray()  # everything the server sent, for "does not leak" checks
        self.auto_ack = True  # return flow-control credit as soon as data arrives
        self.closed = False
        self._pings = 0

    @classmethod
    async def connect(cls, path: str, settings: Mapping[Any, int] | None = None) -> H2Client:
        reader, writer = await asyncio.open_unix_connection(path)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        if settings:
            conn.local_settings = h2.settings.Settings(client=True, initial_values=dict(settings))
        conn.initiate_connection()
        client = cls(reader, writer, conn)
        client.flush()
        # The server's SETTINGS and its connection WINDOW_UPDATE are in place before any stream opens.
        await client.until(
            lambda: (
                client.seen(h2.events.RemoteSettingsChanged)
                and client.seen(h2.events.WindowUpdated, lambda e: e.stream_id == 0)
            )
        )
        return client

    def flush(self) -> None:
        if data := self.h2.data_to_send():
            self.writer.write(data)

    def receive(self, data: bytes) -> None:
        self.received_bytes += data
        for event in self.h2.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.body[event.stream_id] += event.data
                if self.auto_ack:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()

    async def until(self, predicate: Callable[[], object], timeout: float = DEADLINE) -> None:
        async def pump() -> None:
            while not predicate():
                assert not self.closed, "the server closed the connection first"
                data = await read_some(self.reader)
                if data:
                    self.receive(data)
                else:
                    self.closed = True

        await asyncio.wait_for(pump(), timeout)

    async def close(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
            self.flush()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    # -- streams

    def start(self, path: str = ECHO, *, end_stream: bool = False, **kwargs: Any) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, request_headers(path, **kwargs), end_stream=end_stream)
        self.flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end_stream: bool = False, pad_length: int | None = None) -> None:
        self.h2.send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)
        self.flush()

    def end(self, stream_id: int) -> None:
        self.h2.end_stream(stream_id)
        self.flush()

    def send_what_fits(self, stream_id: int, data: bytes) -> bytes:
        """Send as much of `data` as the flow-control windows allow; returns the rest."""
        while data and (window := self.h2.local_flow_control_window(stream_id)) > 0:
            size = min(window, self.h2.max_outbound_frame_size, len(data))
            self.h2.send_data(stream_id, data[:size])
            data = data[size:]
        self.flush()
        return data

    def seen(self, kind: type | tuple[type, ...], where: Callable[[Any], bool] = lambda e: True) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and where(e)]

    def ended(self, stream_id: int) -> bool:
        return bool(self.seen((h2.events.StreamEnded, h2.events.StreamReset), lambda e: e.stream_id == stream_id))

    def headers(self, stream_id: int) -> Headers:
        """The response headers and trailers of a stream, merged."""
        merged: Headers = {}
        for event in self.seen((h2.events.ResponseReceived, h2.events.TrailersReceived)):
            if event.stream_id == stream_id:
                merged.update(event.headers)
        return merged

    def messages(self, stream_id: int) -> list[bytes]:
        return grpc_messages(bytes(self.body[stream_id]))

    async def finish(self, stream_id: int) -> Headers:
        await self.until(lambda: self.ended(stream_id))
        return self.headers(stream_id)

    async def ping_roundtrip(self) -> None:
        """Once the ack is back, the server has acted on everything sent before the PING."""
        self._pings += 1
        payload = b"p%07d" % self._pings
        self.h2.ping(payload)
        self.flush()
        await self.until(lambda: bool(self.seen(h2.events.PingAckReceived, lambda e: e.ping_data == payload)))

    async def call(self, path: str, payload: bytes) -> tuple[list[bytes], Headers]:
        """A whole unary call: request, response messages and the status headers."""
        stream_id = self.start(path)
        self.send(stream_id, grpc_frame(payload), end_stream=True)
        headers = await self.finish(stream_id)
        return self.messages(stream_id), headers


@contextlib.asynccontextmanager
async def h2_client(path: str, settings: Mapping[Any, int] | None = None) -> AsyncIterator[H2Client]:
    client = await H2Client.connect(path, settings)
    try:
        yield client
    finally:
        await client.close()


async def assert_serves(path: str) -> None:
    async with h2_client(path) as client:
        messages, headers = await client.call(ECHO, b"still here")
    assert messages == [b"still here"]
    assert headers[b"grpc-status"] == b"0"


# -- a client of hand-made frames -------------------------------------------------------------------


class RawClient:
    """Writes whatever frames a test builds; parses what comes back; acks PINGs like a real client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.frames: list[hf.Frame] = []
        self.blocks: list[tuple[int, Headers]] = []  # decoded header blocks, by stream
        self.closed = False
        self._buffer = b""

    @classmethod
    async def connect(cls, path: str, *, preface: bool = True) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        if preface:
            client.write(PREFACE + hf.SettingsFrame(0).serialize())
        return client

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, *frames: hf.Frame) -> None:
        self.write(b"".join(frame.serialize() for frame in frames))

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(headers)

    def _parse(self) -> None:
        while len(self._buffer) >= 9:
            frame, length = hf.Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
            self._buffer = self._buffer[9 + length :]
            self.frames.append(frame)
            if isinstance(frame, hf.HeadersFrame):
                assert "END_HEADERS" in frame.flags  # the server never splits its header blocks
                self.blocks.append((frame.stream_id, dict(self.decoder.decode(frame.data, raw=True))))
            elif isinstance(frame, hf.PingFrame) and "ACK" not in frame.flags:
                self.send(hf.PingFrame(0, frame.opaque_data, flags=["ACK"]))

    async def until(self, predicate: Callable[[], object], timeout: float = DEADLINE) -> None:
        async def pump() -> None:
            while not predicate():
                assert not self.closed, "the server closed the connection first"
                data = await read_some(self.reader)
                self._buffer += data
                self._parse()
                self.closed = not data

        await asyncio.wait_for(pump(), timeout)

    async def read_to_eof(self) -> None:
        await self.until(lambda: self.closed)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    def of(self, kind: type[hf.Frame], stream_id: int | None = None) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind) and stream_id in (None, f.stream_id)]

    def ended(self, stream_id: int) -> bool:
        return any(
            f.stream_id == stream_id and ("END_STREAM" in f.flags or isinstance(f, hf.RstStreamFrame))
            for f in self.frames
        )

    def headers(self, stream_id: int) -> Headers:
        merged: Headers = {}
        for sid, block in self.blocks:
            if sid == stream_id:
                merged.update(block)
        return merged

    def messages(self, stream_id: int) -> list[bytes]:
        return grpc_messages(b"".join(f.data for f in self.of(hf.DataFrame, stream_id)))

    async def finish(self, stream_id: int) -> Headers:
        await self.until(lambda: self.ended(stream_id))
        return self.headers(stream_id)


def request_frame(raw: RawClient) -> hf.Frame:
    """HEADERS opening stream 1 with a gRPC request to ECHO."""
    return hf.HeadersFrame(1, raw.block(request_headers()), flags=["END_HEADERS"])


@contextlib.asynccontextmanager
async def raw_client(path: str, *, preface: bool = True) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(path, preface=preface)
    try:
        yield client
    finally:
        await client.close()


# -- interop with grpcio ----------------------------------------------------------------------------


async def test_grpcio_client_echoes_small_and_large_messages(tmp_path: Path) -> None:
    async with serving(tmp_path, {ECHO: echo}) as (_, path), grpc.aio.insecure_channel(f"unix:{path}") as channel:
        unary = channel.unary_unary(ECHO)
        for size in (0, 10, 16 * 1024 + 1, 200_000, 3 * 1024 * 1024):
            payload = random.Random(size).randbytes(size)
            assert await asyncio.wait_for(unary(payload), DEADLINE) == payload, size


# -- bidi streaming ---------------------------------------------------------------------------------


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
            await client.until(lambda i=i: len(client.body[sid]) == (i + 1) * len(grpc_frame(b"re:m0")))
            assert client.messages(sid)[-1] == b"re:m%d" % i
        assert not client.ended(sid)
        client.end(sid)
        headers = await client.finish(sid)
    assert client.messages(sid) == [b"re:m%d" % i for i in range(5)] + [b"bye"]
    assert read_none_after == [5]
    assert headers[b":status"] == b"200"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == b"0"


# -- flow control -----------------------------------------------------------------------------------


async def test_inbound_flow_control_holds_the_client_back_until_the_handler_reads(tmp_path: Path) -> None:
    go = asyncio.Event()
    received: list[bytes] = []

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
            await client.until(lambda g=granted: client.ended(sid) or len(client.body[sid]) == g)
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


# -- padding and CONTINUATION -----------------------------------------------------------------------


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


# -- requests the server turns down -----------------------------------------------------------------


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
    reads: list[bytes | None] = []

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


# -- cancellation by the client ---------------------------------------------------------------------


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


# -- connection-level errors and PING ---------------------------------------------------------------


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


# -- stopping ---------------------------------------------------------------------------------------


async def test_graceful_stop_lets_a_call_in_flight_finish(tmp_path: Path) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(call: Call) -> None:
        started.set()
        await release.wait()
        await call.send(await call.read() or b"")

    async with serving(tmp_path, {ECHO: handler}) as (server, path), raw_client(path) as raw:
        raw.send(request_frame(raw), hf.DataFrame(1, grpc_frame(b"late"), flags=["END_STREAM"]))
        await asyncio.wait_for(started.wait(), DEADLINE)
        stopping = asyncio.create_task(server.stop(grace=5))
        await raw.until(lambda: len(raw.of(hf.GoAwayFrame)) == 2)  # the client acks the server's PING
        first, final = raw.of(hf.GoAwayFrame)
        assert (first.last_stream_id, first.error_code) == (2**31 - 1, 0)
        assert (final.last_stream_id, final.error_code) == (1, 0)
        assert not stopping.done()

        release.set()
        headers = await raw.finish(1)
        await raw.read_to_eof()
        await asyncio.wait_for(stopping, DEADLINE)
    assert raw.messages(1) == [b"late"]
    assert headers[b"grpc-status"] == b"0"
    with pytest.raises(OSError):
        await RawClient.connect(path)  # no longer listening


async def test_graceful_stop_serves_a_call_that_crossed_the_first_goaway(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handler(call: Call) -> None:
        message = await call.read()
        await release.wait()
        await call.send(message or b"")

    async with serving(tmp_path, {ECHO: handler}) as (server, path), raw_client(path) as raw:
        await raw.until(lambda: bool(raw.of(hf.SettingsFrame)))
        raw.send(request_frame(raw), hf.DataFrame(1, grpc_frame(b"crossing"), flags=["END_STREAM"]))
        # The task's first step (GOAWAY + PING) runs before the loop polls the socket holding the request:
        # the request crosses the first GOAWAY, as on a real wire. Its last_stream_id 2^31-1 admits it.
        stopping = asyncio.create_task(server.stop(grace=5))
        await raw.until(lambda: len(raw.of(hf.GoAwayFrame)) == 2)
        assert [goaway.last_stream_id for goaway in raw.of(hf.GoAwayFrame)] == [2**31 - 1, 1]
        release.set()
        headers = await raw.finish(1)
        await asyncio.wait_for(stopping, DEADLINE)
    assert raw.messages(1) == [b"crossing"]
    assert headers[b"grpc-status"] == b"0"


async def test_stop_cancels_calls_still_running_after_the_grace_period(tmp_path: Path) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(call: Call) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving(tmp_path, {ECHO: handler}) as (server, path), raw_client(path) as raw:
        raw.send(request_frame(raw))
        await asyncio.wait_for(started.wait(), DEADLINE)
        began = time.monotonic()
        await asyncio.wait_for(server.stop(grace=0.2), DEADLINE)
        assert time.monotonic() - began < 2
        assert cancelled.is_set()
        headers = await raw.finish(1)
        await raw.read_to_eof()
    assert headers[b"grpc-status"] == b"14"


# -- handler errors ---------------------------------------------------------------------------------


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


# -- fuzzing through a fake transport ---------------------------------------------------------------


class FakeTransport:
    """Records what the connection writes; closes the way asyncio's transports do (connection_lost soon)."""

    def __init__(self, protocol: Connection) -> None:
        self.protocol = protocol
        self.out = bytearray()
        self.closing = self.lost = False
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.lose)

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream_id) + payload


def parse_frames(data: bytes) -> list[Any]:
    """The server's output as frames; fails on anything malformed, HPACK included."""
    frames, position, decoder = [], 0, hpack.Decoder()
    while position < len(data):
        frame, length = hf.Frame.parse_frame_header(memoryview(data[position : position + 9]))
        assert position + 9 + length <= len(data), "truncated frame"
        frame.parse_body(memoryview(data[position + 9 : position + 9 + length]))
        if isinstance(frame, hf.HeadersFrame):
            decoder.decode(frame.data)
        frames.append(frame)
        position += 9 + length
    return frames


def frame_kinds(data: bytes) -> list[int]:
    """Types of the complete frames in what a client sent after its preface."""
    kinds, position = [], len(PREFACE)
    while len(data) - position >= 9:
        kinds.append(data[position + 3])
        position += 9 + int.from_bytes(data[position : position + 3], "big")
    return kinds


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


async def feed(server: Http2Server, chunks: Iterable[bytes]) -> tuple[Connection, FakeTransport]:
    conn = server.protocol()
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        if transport.closing:  # a closed transport reads no more
            break
        conn.data_received(chunk)
    return conn, transport


async def settle(conn: Connection, transport: FakeTransport) -> None:
    """Close the connection and wait for every handler task to be done."""
    transport.close()
    transport.lose()
    others = asyncio.all_tasks() - {asyncio.current_task()}
    await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), DEADLINE)
    assert not conn.streams
    assert conn not in conn.server.connections


def random_splits(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


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


# -- stopping, seen through fake transports ---------------------------------------------------------


async def test_a_connection_accepted_while_stopping_is_drained_too() -> None:
    server = Http2Server({ECHO: echo}, max_message=64)
    hello = [PREFACE + raw_frame(0x4, 0, 0)]
    early, early_transport = await feed(server, hello)
    stopping = asyncio.create_task(server.stop(grace=5))
    await wait_until(lambda: hf.GoAwayFrame in [type(f) for f in parse_frames(bytes(early_transport.out))])
    late, late_transport = await feed(server, hello)  # its accept raced the listener's close
    for conn, transport in ((early, early_transport), (late, late_transport)):
        (ping,) = [f for f in parse_frames(bytes(transport.out)) if isinstance(f, hf.PingFrame)]
        conn.data_received(hf.PingFrame(0, ping.opaque_data, flags=["ACK"]).serialize())  # the peer's ack
    await asyncio.wait_for(stopping, 1)  # not the whole grace period
    for transport in (early_transport, late_transport):
        goaways = [f for f in parse_frames(bytes(transport.out)) if isinstance(f, hf.GoAwayFrame)]
        assert [goaway.last_stream_id for goaway in goaways] == [2**31 - 1, 0]
        assert transport.lost


# -- bounds and cancellation -------------------------------------------------------------------------


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

    server = Http2Server({ECHO: never_reads}, max_message=64 * 1024, connection_buffer=100_000)
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


async def test_empty_data_frames_cost_nothing() -> None:
    server = Http2Server({ECHO: echo}, max_message=64)
    encoder = hpack.Encoder()
    opening = raw_frame(0x1, 0x4, 1, encoder.encode(request_headers())) + raw_frame(0x0, 0, 1, b"\0\0\0")
    conn, transport = await feed(server, [PREFACE + raw_frame(0x4, 0, 0) + opening, raw_frame(0x0, 0, 1) * 5000])
    call = conn.streams[1]
    assert conn.buffered == 3 and len(call._partial) == 1
    await settle(conn, transport)


async def test_a_peer_that_stops_reading_stops_being_read() -> None:
    server = Http2Server({ECHO: echo}, max_message=64)
    conn, transport = await feed(server, [PREFACE + raw_frame(0x4, 0, 0)])
    conn.pause_writing()
    assert transport.reading is False
    conn.resume_writing()
    assert transport.reading is True
    await settle(conn, transport)


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
