"""HTTP/2 peers for the native transport's tests, independent of the code under test.

`h2` (python-hyper) is the main client: its own state machine and flow-control bookkeeping check what the
server sends. Frames h2 will not produce (padded or split header blocks, protocol violations, a client
that keeps talking after GOAWAY) are hand-made with `hyperframe` and `hpack`. grpcio's client checks
interop with a standard gRPC stack. `FakeTransport` feeds a `Connection` directly, for fuzzing."""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
from hyperframe import frame as hf

from sidecar.config import Limits
from sidecar.extproc.http2 import Call, Handler, Http2Server
from sidecar.extproc.http2.connection import Connection
from sidecar.extproc.http2.frames import PREFACE
from tests.support.wait import wait_until

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


async def read_some(reader: asyncio.StreamReader) -> bytes:
    """The next bytes from the server; b"" once it closed (a reset counts: replies can race its close)."""
    try:
        return await reader.read(1 << 16)
    except ConnectionError:
        return b""


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    routes: Mapping[str, Handler],
    *,
    max_message: int = 4 * 1024 * 1024,
    limits: Limits | None = None,
    on_error: Callable[[str], None] | None = None,
) -> AsyncIterator[tuple[Http2Server, str]]:
    server = Http2Server(routes, max_message=max_message, limits=limits, on_error=on_error)
    path = str(tmp_path / "h2.sock")
    server.add_listener(await asyncio.get_running_loop().create_unix_server(server.protocol, path=path))
    try:
        yield server, path
    finally:
        await server.stop(0)
        await wait_until(lambda: not server.connections)


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

    def writelines(self, pieces: Iterable[bytes | memoryview]) -> None:
        for piece in pieces:
            self.out += piece

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is taken at once

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # no socket

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.close()  # the peer's half of a half-close is not modelled

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


# -- attacks: raw frames a hostile peer sends, each bounded in count (tests/extproc/http2/test_attacks.py)

SETTINGS_FRAME = raw_frame(0x4, 0, 0)
CLIENT_HELLO = PREFACE + SETTINGS_FRAME
ATTACK_CHUNKS = 400  # chunks an attack writes at most; each holds many frames


def opening(
    encoder: hpack.Encoder, stream_id: int, *, path: str = ECHO, end_headers: bool = True, **kwargs: Any
) -> bytes:
    """HEADERS opening `stream_id` with a gRPC request."""
    return raw_frame(0x1, 0x4 if end_headers else 0, stream_id, encoder.encode(request_headers(path, **kwargs)))


def repeated(first: bytes, unit: bytes, per_chunk: int, chunks: int = ATTACK_CHUNKS) -> list[bytes]:
    """`first`, then `chunks` chunks of `per_chunk` copies of `unit`."""
    return [first + unit * per_chunk] + [unit * per_chunk] * (chunks - 1)


def new_streams(build: Callable[[hpack.Encoder, int], bytes], per_chunk: int = 50, chunks: int = 100) -> list[bytes]:
    """Chunks of frames for streams 1, 3, 5, ...: `build(encoder, stream_id)` makes each stream's frames."""
    encoder = hpack.Encoder()
    ids = iter(range(1, 2 * per_chunk * chunks, 2))
    return [b"".join(build(encoder, next(ids)) for _ in range(per_chunk)) for _ in range(chunks)]


class AttackOutcome:
    """What the server did to an attacking connection: its GOAWAY (if one arrived) and whether it closed."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.closed = False
        self.sent = 0  # chunks written
        self._buffer = b""

    @property
    def goaway(self) -> int | None:
        codes = [f.error_code for f in self.frames if isinstance(f, hf.GoAwayFrame)]
        return codes[-1] if codes else None

    def parse(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 9:
            frame, length = hf.Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
            self._buffer = self._buffer[9 + length :]
            self.frames.append(frame)


async def attack(
    path: str,
    chunks: Iterable[bytes],
    *,
    hello: bytes = CLIENT_HELLO,
    read: bool = True,
    probe: bool = True,
    started: asyncio.Event | None = None,
    deadline: float = DEADLINE,
) -> AttackOutcome:
    """Send `chunks` after `hello` until they run out or the server closes; then, if it is still open,
    ask a PING of it (`probe`): an ack means it read everything and kept the connection. Without `probe`,
    read until the server closes. Bounded by `deadline`.

    With `read=False` nothing the server sends is read until every chunk went out (a peer that does not
    read); `started` is set once the first chunk is written, for a legitimate call to run meanwhile."""
    outcome = AttackOutcome()
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)

    async def pump() -> None:
        while data := await read_some(reader):
            outcome.parse(data)
            if any(isinstance(f, hf.PingFrame) and f.opaque_data == b"attacked" for f in outcome.frames):
                return
        outcome.closed = True

    async def run() -> None:
        reading = asyncio.create_task(pump()) if read else None
        try:
            writer.write(hello)
            for chunk in chunks:
                if outcome.closed or writer.is_closing():
                    break
                writer.write(chunk)
                outcome.sent += 1
                if started is not None:
                    started.set()
                await writer.drain()
            if probe:
                writer.write(raw_frame(PING, 0, 0, b"attacked"))
                await writer.drain()
        except ConnectionError:
            pass  # the server closed the connection while the attack wrote
        if reading is None:
            reading = asyncio.create_task(pump())
        await reading

    try:
        with contextlib.suppress(TimeoutError):  # then `closed` stays False: the server kept the connection
            await asyncio.wait_for(run(), deadline)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        if started is not None:
            started.set()
    return outcome
