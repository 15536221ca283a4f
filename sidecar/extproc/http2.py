"""A small HTTP/2 server for gRPC calls, running entirely on the asyncio event loop.

Why it exists: grpcio's asyncio server hands every message between its C-core threads and the event
loop; on a 2-core machine a do-nothing two-message ext_proc stream costs it ~320 us of CPU, over the
sidecar's whole budget. Framing the same calls on the loop thread costs a fraction of that
(`docs/benchmarks.md`). `transport: grpcio` keeps grpcio available.

What it implements of RFC 9113, for gRPC servers: the connection preface, SETTINGS, flow control in both
directions (receive credit is returned as the handler consumes messages, so a slow handler holds back
its peer instead of buffering without bound), PING, RST_STREAM, CONTINUATION, padding, and a two-step
graceful GOAWAY. Header blocks are decoded by the `hpack` package; responses are encoded without the
dynamic table. Not implemented, by design: server push, priorities, message compression (a compressed
message ends its call with INTERNAL) and h2c upgrade from HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from enum import IntEnum
from typing import cast

import hpack

__all__ = ["Call", "CallError", "Handler", "Http2Server", "Status"]

log = logging.getLogger("sidecar.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    range(10)
)
_END_STREAM = _ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20

_FRAME_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, length
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")

_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65_535
#: What this server advertises. Windows are generous because the peer is local and a BUFFERED body
#: arrives as one message; credit is still only returned as the handler consumes messages.
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 64 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_HEADER_LIST = 64 * 1024
MAX_CONCURRENT_STREAMS = 1024
#: What one received message costs beyond its bytes (Python objects), for the connection's buffer budget.
_MESSAGE_COST = 96
_MAX_SETTINGS = 64
_SHUTDOWN_PING = b"drain\0\0\0"


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class Status(IntEnum):
    """gRPC status codes this server sends."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class CallError(Exception):
    """Raised by a handler to end its call with a status other than OK."""

    def __init__(self, status: Status, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[["Call"], Awaitable[None]]


# -- encoding ----------------------------------------------------------------------------------------


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _FRAME_HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def _reset(stream_id: int, code: ErrorCode) -> bytes:
    return _frame(_RST_STREAM, 0, stream_id, _U32.pack(code))


def _goaway(last_stream_id: int, code: ErrorCode, debug: bytes = b"") -> bytes:
    return _frame(_GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code) + debug)


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as 'literal without indexing, new name': leaves the peer's dynamic table alone."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


def _grpc_message(message: str) -> bytes:
    """Percent-encode as gRPC requires for grpc-message; capped so trailers fit one frame."""
    raw = message.encode("utf-8", "replace")[:1024]
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


# `:status: 200` is static-table entry 8; content-type is entry 31, sent as a literal with that name.
_RESPONSE_HEADERS = b"\x88" + _hpack_int(31, 4, 0) + _hpack_int(16, 7, 0) + b"application/grpc"
_TRAILERS_OK = _literal(b"grpc-status", b"0")


def _status_block(status: Status, message: str) -> bytes:
    block = _literal(b"grpc-status", str(int(status)).encode())
    if message:
        block += _literal(b"grpc-message", _grpc_message(message))
    return block


# -- calls -------------------------------------------------------------------------------------------


class Call:
    """One gRPC call on one HTTP/2 stream: length-prefixed messages in, messages and a status out."""

    __slots__ = (
        "_buffered",
        "_conn",
        "_finished",
        "_headers_sent",
        "_messages",
        "_midway",
        "_partial",
        "_partial_needed",
        "_partial_size",
        "_recv_window",
        "_remote_done",
        "_send_waiter",
        "_unacked",
        "_waiter",
        "metadata",
        "path",
        "send_window",
        "stream_id",
        "task",
    )

    def __init__(self, conn: Connection, stream_id: int, path: str, metadata: dict[str, str]) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.path = path
        #: Request headers other than pseudo-headers, names lower-case, values decoded as latin-1.
        self.metadata = metadata
        self._messages: deque[bytes] = deque()
        self._partial: list[bytes] = []
        self._partial_size = self._partial_needed = 0
        self._waiter: asyncio.Future[None] | None = None
        self._remote_done = False
        self._finished = False
        self._headers_sent = False
        self._recv_window = STREAM_WINDOW
        self._unacked = 0
        #: Bytes this call holds in received messages and the partial one, counted against the connection.
        self._buffered = 0
        self.send_window = conn.peer_initial_window
        self._send_waiter: asyncio.Future[None] | None = None
        #: A message is partly sent: nothing but a reset may follow.
        self._midway = False
        self.task: asyncio.Task[None] | None = None

    # -- receiving

    async def read(self) -> bytes | None:
        """The next message, or None once the client has half-closed and every message was read.

        One reader per call: the handler."""
        messages = self._messages
        if not messages:
            if self._remote_done:
                return None
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if not messages:
                return None
        message = messages.popleft()
        self._hold(-len(message) - _MESSAGE_COST)
        if not messages:
            self._return_credit()
        return message

    def _hold(self, size: int) -> None:
        self._buffered += size
        self._conn.buffered += size

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _return_credit(self) -> None:
        # Credit goes back only once every complete message was handed to the handler: what is buffered
        # is bounded by the window plus one partial message.
        if self._unacked >= STREAM_WINDOW // 2 and not self._remote_done and not self._finished:
            self._conn.write(_frame(_WINDOW_UPDATE, 0, self.stream_id, _U32.pack(self._unacked)))
            self._recv_window += self._unacked
            self._unacked = 0

    def _on_data(self, payload: bytes, flow_length: int, end_stream: bool) -> None:
        if self._remote_done:
            self._conn.reset_stream(self, ErrorCode.STREAM_CLOSED)
            return
        self._recv_window -= flow_length
        if self._recv_window < 0:
            self._conn.reset_stream(self, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self._unacked += flow_length
        if not payload and not end_stream:
            return  # costs the sender nothing, so it must cost this side nothing either
        if self._partial:
            # A message spread over many frames: joined once, when it is complete.
            self._partial.append(payload)
            self._partial_size += len(payload)
            self._hold(len(payload))
            if self._partial_size < self._partial_needed and not end_stream:
                if not self._messages:
                    self._return_credit()  # the rest of this message cannot arrive without it
                return
            data = b"".join(self._partial)
            self._partial = []
            self._hold(-self._partial_size)
        else:
            data = payload
        size = len(data)
        position = 0
        needed = 5
        messages = self._messages
        received = False
        while size - position >= 5:
            compressed, length = _MESSAGE_PREFIX.unpack_from(data, position)
            if compressed:
                self.abandon(Status.INTERNAL, "compressed messages are not supported")
                return
            if length > self._conn.server.max_message:
                self.abandon(Status.RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds the limit")
                return
            end = position + 5 + length
            if end > size:
                needed = 5 + length
                break
            messages.append(data[position + 5 : end])
            self._hold(length + _MESSAGE_COST)
            received = True
            position = end
        if position < size:
            self._partial = [data[position:]]
            self._partial_size = size - position
            self._partial_needed = needed
            self._hold(self._partial_size)
        if end_stream:
            self._remote_done = True
            if self._partial:
                self.abandon(Status.INTERNAL, "stream ended inside a message")
                return
            self._wake()
        elif received:
            self._wake()
        if not messages:
            self._return_credit()

    def _on_remote_end(self) -> None:
        self._remote_done = True
        if self._partial:  # trailers ended the stream inside a message
            self.abandon(Status.INTERNAL, "stream ended inside a message")
            return
        self._wake()

    # -- sending

    async def send(self, message: bytes) -> None:
        """Send one message; waits only when flow control or the socket buffer asks it to.

        One sender at a time per call. Cancelled half-way, the message cannot be completed: the stream
        is reset instead, so the client never parses a cut message as the start of the next."""
        if self._finished:
            return
        conn = self._conn
        head = b""
        if not self._headers_sent:
            self._headers_sent = True
            head = _frame(_HEADERS, _END_HEADERS, self.stream_id, _RESPONSE_HEADERS)
        data = _MESSAGE_PREFIX.pack(0, len(message)) + message
        size = len(data)
        if size <= conn.peer_max_frame and size <= self.send_window and size <= conn.send_window and conn.writable:
            self.send_window -= size
            conn.send_window -= size
            conn.write(head + _FRAME_HEAD.pack(size << 8 | _DATA, 0, self.stream_id) + data)
            return
        pieces: list[bytes | memoryview] = [head]
        view = memoryview(data)
        try:
            while view and not self._finished:
                allowed = min(len(view), self.send_window, conn.send_window)
                if allowed <= 0 or not conn.writable:
                    if pieces:
                        conn.write(b"".join(pieces))
                        pieces = []
                    if self.send_window <= 0:
                        self._send_waiter = conn.loop.create_future()
                        await self._send_waiter
                    else:
                        await conn.wait_for_window()
                    continue
                self.send_window -= allowed
                conn.send_window -= allowed
                for offset in range(0, allowed, conn.peer_max_frame):
                    chunk = view[offset : min(offset + conn.peer_max_frame, allowed)]
                    pieces += (_FRAME_HEAD.pack(len(chunk) << 8 | _DATA, 0, self.stream_id), chunk)
                conn.write(b"".join(pieces))
                pieces = []
                view = view[allowed:]
                self._midway = bool(view)
        except asyncio.CancelledError:
            if self._midway:
                self.finish()  # a reset, see finish()
            raise
        finally:
            self._send_waiter = None

    def _wake_sender(self) -> None:
        waiter = self._send_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self, status: Status = Status.OK, message: str = "") -> None:
        """Send the status as trailers (or a trailers-only response) and close the stream."""
        if self._finished:
            return
        self._finished = True
        conn = self._conn
        if self._midway:  # after a cut message no status can be read correctly: reset instead
            conn.write(_reset(self.stream_id, ErrorCode.CANCEL))
            conn.forget(self)
            return
        if status is Status.OK and self._headers_sent and not message:
            block = _TRAILERS_OK
        else:
            block = (b"" if self._headers_sent else _RESPONSE_HEADERS) + _status_block(status, message)
        out = _frame(_HEADERS, _END_STREAM | _END_HEADERS, self.stream_id, block)
        if not self._remote_done:  # the client may still be sending: tell it to stop
            out += _reset(self.stream_id, ErrorCode.NO_ERROR)
        conn.write(out)
        conn.forget(self)

    def abandon(self, status: Status, message: str) -> None:
        """End the call from the transport's side: status to the client, handler cancelled."""
        log.warning("ending gRPC call %s: %s", self.path, message)
        self._conn.server.on_error(f"http2_{status.name.lower()}")
        self.finish(status, message)
        self._cancel()

    def _cancel(self) -> None:
        self._finished = True
        self._release()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _release(self) -> None:
        self._messages.clear()
        self._partial = []
        self._hold(-self._buffered)


# -- connections -------------------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """Server side of one HTTP/2 connection."""

    def __init__(self, server: Http2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_size = self._pending_needed = 0
        self._preface_seen = False
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_LIST
        self._continuation: tuple[int, bool, bytearray] | None = None
        self.streams: dict[int, Call] = {}
        #: The highest stream id the peer has used, and the highest this side served or refused (for GOAWAY).
        self._highest_stream_id = 0
        self._last_stream_id = 0
        self.buffered = 0
        self._recv_window = CONNECTION_WINDOW
        self._unacked = 0
        self.peer_initial_window = _DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.send_window = _DEFAULT_WINDOW
        self.writable = True
        self._window_waiter: asyncio.Future[None] | None = None
        self._draining = False
        self._final_goaway = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.server.connections.add(self)
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (0x3, MAX_CONCURRENT_STREAMS),
                (0x4, STREAM_WINDOW),
                (0x5, MAX_FRAME),
                (0x6, MAX_HEADER_LIST),
            )
        )
        self.write(
            _frame(_SETTINGS, 0, 0, settings)
            + _frame(_WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - _DEFAULT_WINDOW))
        )
        if self.server.stopping:  # accepted just as the server began to stop: drain it as well
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        for call in list(self.streams.values()):
            call._cancel()
        self.streams.clear()
        self._wake_senders()
        self.server.stream_closed()  # the server may be waiting for this connection's calls

    def pause_writing(self) -> None:
        # The peer is not reading what this side writes: stop reading what it sends (its requests would
        # otherwise queue replies here without bound).
        self.writable = False
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writable = True
        if self.transport is not None:
            self.transport.resume_reading()
        self._wake_senders()

    def data_received(self, data: bytes) -> None:
        if self._pending:
            # A frame bigger than one read: keep the pieces and join them once, when it is complete.
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._pending_needed:
                return
            data = b"".join(self._pending)
            self._pending = []
        if not self._preface_seen:
            if len(data) < len(PREFACE):
                if not PREFACE.startswith(data):
                    self._close_unspoken()
                    return
                self._keep(data, len(PREFACE))
                return
            if not data.startswith(PREFACE):
                self._close_unspoken()
                return
            self._preface_seen = True
            data = data[len(PREFACE) :]
        position = 0
        size = len(data)
        needed = 9
        try:
            while size - position >= 9:
                head, flags, stream_id = _FRAME_HEAD.unpack_from(data, position)
                length = head >> 8
                if length > MAX_FRAME:
                    raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = position + 9 + length
                if end > size:
                    needed = 9 + length
                    break
                self._on_frame(head & 0xFF, flags, stream_id & _MAX_WINDOW, data[position + 9 : end])
                position = end
                if self.transport is None or self.transport.is_closing():
                    return
        except _ConnectionError as exc:
            self.fail(exc.code, str(exc))
            return
        if position < size:
            self._keep(data[position:], needed)

    def _keep(self, rest: bytes, needed: int) -> None:
        self._pending = [rest]
        self._pending_size = len(rest)
        self._pending_needed = needed

    def _close_unspoken(self) -> None:
        log.warning("closing a connection that did not start with the HTTP/2 preface (is the client gRPC?)")
        if self.transport is not None:
            self.transport.close()

    # -- frames

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and (kind != _CONTINUATION or stream_id != self._continuation[0]):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == _DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == _HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == _WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == _SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == _PING:
            self._on_ping(flags, stream_id, payload)
        elif kind == _RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed RST_STREAM")
            call = self.streams.get(stream_id)
            if call is not None:
                call._cancel()
                self.forget(call)
        elif kind == _GOAWAY:
            self._draining = self._final_goaway = True
            if not self.streams and self.transport is not None:
                self.transport.close()
        elif kind == _CONTINUATION:
            if self._continuation is None:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            block = self._continuation[2]
            block += payload
            if len(block) > MAX_HEADER_LIST:
                raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
            if flags & _END_HEADERS:
                stream, end_stream, _ = self._continuation
                self._continuation = None
                self._on_header_block(stream, end_stream, bytes(block))
        elif kind == _PUSH_PROMISE:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        elif kind == _PRIORITY and len(payload) != 5:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "malformed PRIORITY")
        # Other frame types are extensions: ignored, as RFC 9113 requires.

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & _PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        flow_length = len(payload)
        self._recv_window -= flow_length
        if self._recv_window < 0:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "peer overran the connection window")
        # Connection credit returns at once: per-stream windows bound what each call buffers.
        self._unacked += flow_length
        if self._unacked >= CONNECTION_WINDOW // 2:
            self.write(_frame(_WINDOW_UPDATE, 0, 0, _U32.pack(self._unacked)))
            self._recv_window += self._unacked
            self._unacked = 0
        call = self.streams.get(stream_id)
        if call is None:
            if stream_id == 0 or stream_id > self._highest_stream_id:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream this side already closed: its data is dropped
        call._on_data(self._unpad(flags, payload), flow_length, bool(flags & _END_STREAM))
        if self.buffered > self.server.connection_buffer and self.streams:
            # Over budget: the call holding the most gives way, rather than the peer's credit being held
            # back (which could leave calls waiting on one another's partial messages).
            largest = max(self.streams.values(), key=lambda c: c._buffered)
            largest.abandon(Status.RESOURCE_EXHAUSTED, "the connection's receive buffer is full")

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        if len(payload) > MAX_HEADER_LIST:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        payload = self._unpad(flags, payload)
        if flags & _PRIORITY_FLAG:
            if len(payload) < 5:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        if flags & _END_HEADERS:
            self._on_header_block(stream_id, bool(flags & _END_STREAM), payload)
        else:
            self._continuation = (stream_id, bool(flags & _END_STREAM), bytearray(payload))

    def _on_header_block(self, stream_id: int, end_stream: bool, block: bytes) -> None:
        try:
            # Decoded even for streams that are refused: the dynamic table must stay in step.
            headers = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header list too large") from None
        except hpack.HPACKError as exc:
            raise _ConnectionError(ErrorCode.COMPRESSION_ERROR, f"bad header block: {exc}") from None
        call = self.streams.get(stream_id)
        if call is not None:  # trailers: they carry nothing a gRPC server reads, but end the stream
            if not end_stream:
                self.reset_stream(call, ErrorCode.PROTOCOL_ERROR)
            else:
                call._on_remote_end()
            return
        if stream_id <= self._highest_stream_id:
            return  # trailers for a stream this side already closed
        self._highest_stream_id = stream_id
        if self._final_goaway:
            return  # above the last stream id this side promised to serve: the peer will retry it
        self._last_stream_id = stream_id
        path = content_type = b""
        metadata: dict[str, str] = {}
        for name, value in headers:
            if name[:1] == b":":
                if name == b":path":
                    path = value
            elif name == b"content-type":
                content_type = value
            else:
                metadata[name.decode("latin-1")] = value.decode("latin-1")
        if not content_type.startswith(b"application/grpc"):
            self.write(_frame(_HEADERS, _END_STREAM | _END_HEADERS, stream_id, b"\x00\x07:status\x03415"))
            if not end_stream:
                self.write(_reset(stream_id, ErrorCode.NO_ERROR))
            return
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self.write(_reset(stream_id, ErrorCode.REFUSED_STREAM))
            return
        call = Call(self, stream_id, path.decode("latin-1"), metadata)
        call._remote_done = end_stream
        self.streams[stream_id] = call
        handler = self.server.routes.get(call.path)
        if handler is None:
            call.finish(Status.UNIMPLEMENTED, f"unknown method {call.path[:100]}")
            return
        call.task = self.loop.create_task(self._run(call, handler))

    async def _run(self, call: Call, handler: Handler) -> None:
        try:
            await handler(call)
        except CallError as exc:
            call.finish(exc.status, exc.message)
        except asyncio.CancelledError:
            call.finish(Status.CANCELLED, "cancelled")  # a no-op when the peer reset it
        except Exception:
            log.exception("gRPC handler for %s failed", call.path)
            call.finish(Status.INTERNAL, "internal error")
        else:
            call.finish()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & _MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > _MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            call = self.streams.get(stream_id)
            if call is None:
                return
            call.send_window += increment
            if increment == 0:
                self.reset_stream(call, ErrorCode.PROTOCOL_ERROR)
            elif call.send_window > _MAX_WINDOW:
                self.reset_stream(call, ErrorCode.FLOW_CONTROL_ERROR)
            else:
                call._wake_sender()
            return
        self._wake_senders()

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if payload:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "malformed SETTINGS")
        if len(payload) > 6 * _MAX_SETTINGS:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "too many SETTINGS entries")
        initial_window = self.peer_initial_window
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == 0x4:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "initial window too large")
                initial_window = value
            elif key == 0x5:
                if not 16_384 <= value <= 16_777_215:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid MAX_FRAME_SIZE")
                self.peer_max_frame = value
        delta = initial_window - self.peer_initial_window
        if delta:  # INITIAL_WINDOW_SIZE applies to open streams as a delta
            self.peer_initial_window = initial_window
            for call in self.streams.values():
                call.send_window += delta
                if call.send_window > _MAX_WINDOW:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")
                call._wake_sender()
        self.write(_frame(_SETTINGS, _ACK, 0))
        self._wake_senders()

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) != 8:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "malformed PING")
        if not flags & _ACK:
            self.write(_frame(_PING, _ACK, 0, payload))
        elif payload == _SHUTDOWN_PING and self._draining and not self._final_goaway:
            # Every stream the peer opened before it saw the first GOAWAY has now arrived.
            self._final_goaway = True
            self.write(_goaway(self._last_stream_id, ErrorCode.NO_ERROR))
            if not self.streams and self.transport is not None:
                self.transport.close()

    # -- used by calls and the server

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def wait_for_window(self) -> None:
        if self._window_waiter is None:
            self._window_waiter = self.loop.create_future()
        # Shared by every blocked sender: shielded, so cancelling one of them does not cancel the others.
        await asyncio.shield(self._window_waiter)

    def _wake_senders(self) -> None:
        waiter, self._window_waiter = self._window_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def forget(self, call: Call) -> None:
        call._release()
        if self.streams.pop(call.stream_id, None) is not None:
            self.server.stream_closed()
        if self._final_goaway and not self.streams and self.transport is not None:
            self.transport.close()

    def reset_stream(self, call: Call, code: ErrorCode) -> None:
        call._finished = True
        self.write(_reset(call.stream_id, code))
        self.forget(call)
        call._cancel()

    def fail(self, code: ErrorCode, message: str) -> None:
        """A connection error: GOAWAY with the code, then close."""
        log.warning("closing HTTP/2 connection: %s", message)
        self.server.on_error(f"http2_{code.name.lower()}")
        self.write(_goaway(self._last_stream_id, code, message.encode()[:256]))
        for call in list(self.streams.values()):
            call._cancel()
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Start a graceful close: GOAWAY for 'no new streams soon', then a PING to learn when to cut off."""
        if self._draining:
            return
        self._draining = True
        self.write(_goaway(_MAX_WINDOW, ErrorCode.NO_ERROR) + _frame(_PING, 0, 0, _SHUTDOWN_PING))

    def abort(self) -> None:
        for call in list(self.streams.values()):
            call.finish(Status.UNAVAILABLE, "server shutting down")
            call._cancel()
        if self.transport is not None:
            if self.writable:
                self.transport.close()  # after the statuses above are written
            else:
                self.transport.abort()  # the peer is not reading: closing would wait for it forever


# -- the server --------------------------------------------------------------------------------------


class Http2Server:
    """Routes gRPC calls by path to handlers; listens on any number of asyncio servers."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        max_message: int,
        connection_buffer: int | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.routes = dict(routes)
        #: Told the reason whenever the transport ends a call or a connection (for metrics).
        self.on_error: Callable[[str], None] = on_error or (lambda reason: None)
        self.max_message = max_message
        #: What one connection may hold in received, not yet consumed messages before its biggest call
        #: is ended with RESOURCE_EXHAUSTED; by default room for two of the largest messages.
        self.connection_buffer = connection_buffer or max(64 * 1024 * 1024, 2 * max_message)
        self.connections: set[Connection] = set()
        self._listeners: list[asyncio.AbstractServer] = []
        self._idle: asyncio.Event | None = None

    def protocol(self) -> Connection:
        return Connection(self)

    @property
    def stopping(self) -> bool:
        return self._idle is not None

    def add_listener(self, listener: asyncio.AbstractServer) -> None:
        self._listeners.append(listener)

    def stream_closed(self) -> None:
        # Idle only once every connection also sent its final GOAWAY: until the peer acks the draining PING,
        # a stream it opened before it saw the first GOAWAY may still arrive, and must be served.
        if self._idle is not None and not any(conn.streams or not conn._final_goaway for conn in self.connections):
            self._idle.set()

    async def stop(self, grace: float) -> None:
        """Stop listening, let open calls finish within `grace` seconds, then cut the rest off."""
        for listener in self._listeners:
            listener.close()
        self._idle = asyncio.Event()
        for conn in list(self.connections):
            conn.drain()
        self.stream_closed()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("grace period over: cancelling %d open calls", sum(len(c.streams) for c in self.connections))
        for conn in list(self.connections):
            conn.abort()
        for listener in self._listeners:
            await listener.wait_closed()
