"""The server side of one HTTP/2 connection: frames in, calls opened, flow control and shutdown.

Reads frames in place from what the socket delivered (a frame bigger than one read is joined once),
enforces the connection's limits (frame and header sizes, concurrent streams, flow-control windows, the
receive buffer budget) and turns every violation into GOAWAY (a connection error) or RST_STREAM (a stream
error). Each gRPC call runs its handler in a task of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, cast

import hpack

from sidecar.extproc.http2.call import Call, Handler
from sidecar.extproc.http2.flow import ReceiveWindow, SendWindow
from sidecar.extproc.http2.frames import (
    ACK,
    CONNECTION_WINDOW,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    FRAME_HEAD,
    GOAWAY,
    HEADERS,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME,
    MAX_HEADER_LIST,
    MAX_SETTINGS,
    MAX_WINDOW,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    U32,
    WINDOW_UPDATE,
    ErrorCode,
    Http2Error,
    frame,
    goaway,
    reset,
    server_settings,
    unpad,
    window_update,
)
from sidecar.extproc.status import CallError, Status

__all__ = ["Connection", "Endpoint"]

log = logging.getLogger("sidecar.http2")

_SHUTDOWN_PING = b"drain\0\0\0"


class Endpoint(Protocol):
    """What a connection needs from the server that accepted it (`server.Http2Server`)."""

    @property
    def routes(self) -> dict[str, Handler]: ...

    @property
    def max_message(self) -> int: ...

    @property
    def connection_buffer(self) -> int: ...

    @property
    def on_error(self) -> Callable[[str], None]: ...

    @property
    def connections(self) -> set[Connection]: ...

    @property
    def stopping(self) -> bool: ...

    def stream_closed(self) -> None: ...


class Connection(asyncio.Protocol):
    """Server side of one HTTP/2 connection."""

    def __init__(self, server: Endpoint) -> None:
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
        #: Bytes held in received messages not yet read by their handlers, over every call (the budget).
        self.buffered = 0
        self._receive = ReceiveWindow(CONNECTION_WINDOW)
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.send_window = SendWindow(DEFAULT_WINDOW)
        self.writable = True
        self._draining = False
        self._final_goaway = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.server.connections.add(self)
        self.write(server_settings())
        if self.server.stopping:  # accepted just as the server began to stop: drain it as well
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        for call in list(self.streams.values()):
            call._cancel()
        self.streams.clear()
        self.send_window.wake()
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
        self.send_window.wake()

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
                head, flags, stream_id = FRAME_HEAD.unpack_from(data, position)
                length = head >> 8
                if length > MAX_FRAME:
                    raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = position + 9 + length
                if end > size:
                    needed = 9 + length
                    break
                self._on_frame(head & 0xFF, flags, stream_id & MAX_WINDOW, data[position + 9 : end])
                position = end
                if self.transport is None or self.transport.is_closing():
                    return
        except Http2Error as exc:
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
        if self._continuation is not None and (kind != CONTINUATION or stream_id != self._continuation[0]):
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == PING:
            self._on_ping(flags, stream_id, payload)
        elif kind == RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, "malformed RST_STREAM")
            call = self.streams.get(stream_id)
            if call is not None:
                call._cancel()
                self.forget(call)
        elif kind == GOAWAY:
            self._draining = self._final_goaway = True
            if not self.streams and self.transport is not None:
                self.transport.close()
        elif kind == CONTINUATION:
            if self._continuation is None:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            block = self._continuation[2]
            block += payload
            if len(block) > MAX_HEADER_LIST:
                raise Http2Error(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
            if flags & END_HEADERS:
                stream, end_stream, _ = self._continuation
                self._continuation = None
                self._on_header_block(stream, end_stream, bytes(block))
        elif kind == PUSH_PROMISE:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        elif kind == PRIORITY and len(payload) != 5:
            raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "malformed PRIORITY")
        # Other frame types are extensions: ignored, as RFC 9113 requires.

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        flow_length = len(payload)
        if not self._receive.consume(flow_length):
            raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR, "peer overran the connection window")
        # Connection credit returns at once: per-stream windows bound what each call buffers.
        if self._receive.credit_due:
            self.write(window_update(0, self._receive.return_credit()))
        call = self.streams.get(stream_id)
        if call is None:
            if stream_id == 0 or stream_id > self._highest_stream_id:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream this side already closed: its data is dropped
        call._on_data(unpad(flags, payload), flow_length, bool(flags & END_STREAM))
        if self.buffered > self.server.connection_buffer and self.streams:
            # Over budget: the call holding the most gives way, rather than the peer's credit being held
            # back (which could leave calls waiting on one another's partial messages).
            largest = max(self.streams.values(), key=lambda c: c._buffered)
            largest.abandon(Status.RESOURCE_EXHAUSTED, "the connection's receive buffer is full")

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        if len(payload) > MAX_HEADER_LIST:
            raise Http2Error(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        payload = unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        if flags & END_HEADERS:
            self._on_header_block(stream_id, bool(flags & END_STREAM), payload)
        else:
            self._continuation = (stream_id, bool(flags & END_STREAM), bytearray(payload))

    def _on_header_block(self, stream_id: int, end_stream: bool, block: bytes) -> None:
        try:
            # Decoded even for streams that are refused: the dynamic table must stay in step.
            headers = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError:
            raise Http2Error(ErrorCode.ENHANCE_YOUR_CALM, "header list too large") from None
        except hpack.HPACKError as exc:
            raise Http2Error(ErrorCode.COMPRESSION_ERROR, f"bad header block: {exc}") from None
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
            self.write(frame(HEADERS, END_STREAM | END_HEADERS, stream_id, b"\x00\x07:status\x03415"))
            if not end_stream:
                self.write(reset(stream_id, ErrorCode.NO_ERROR))
            return
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self.write(reset(stream_id, ErrorCode.REFUSED_STREAM))
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
            raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = U32.unpack(payload)[0] & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            if not self.send_window.grow(increment):
                raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self.send_window.wake()
            return
        call = self.streams.get(stream_id)
        if call is None:
            return
        fits = call.send_window.grow(increment)
        if increment == 0:
            self.reset_stream(call, ErrorCode.PROTOCOL_ERROR)
        elif not fits:
            self.reset_stream(call, ErrorCode.FLOW_CONTROL_ERROR)
        else:
            call.send_window.wake()

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        if len(payload) % 6:
            raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "malformed SETTINGS")
        if len(payload) > 6 * MAX_SETTINGS:
            raise Http2Error(ErrorCode.ENHANCE_YOUR_CALM, "too many SETTINGS entries")
        initial_window = self.peer_initial_window
        for offset in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR, "initial window too large")
                initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise Http2Error(ErrorCode.PROTOCOL_ERROR, "invalid MAX_FRAME_SIZE")
                self.peer_max_frame = value
        delta = initial_window - self.peer_initial_window
        if delta:  # INITIAL_WINDOW_SIZE applies to open streams as a delta
            self.peer_initial_window = initial_window
            for call in self.streams.values():
                if not call.send_window.grow(delta):
                    raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")
                call.send_window.wake()
        self.write(frame(SETTINGS, ACK, 0))
        self.send_window.wake()

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) != 8:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "malformed PING")
        if not flags & ACK:
            self.write(frame(PING, ACK, 0, payload))
        elif payload == _SHUTDOWN_PING and self._draining and not self._final_goaway:
            # Every stream the peer opened before it saw the first GOAWAY has now arrived.
            self._final_goaway = True
            self.write(goaway(self._last_stream_id, ErrorCode.NO_ERROR))
            if not self.streams and self.transport is not None:
                self.transport.close()

    # -- used by calls and the server

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    @property
    def closed_for_new_streams(self) -> bool:
        """This side sent its final GOAWAY: no stream above its last stream id will be served."""
        return self._final_goaway

    def forget(self, call: Call) -> None:
        call._release()
        if self.streams.pop(call.stream_id, None) is not None:
            self.server.stream_closed()
        if self._final_goaway and not self.streams and self.transport is not None:
            self.transport.close()

    def reset_stream(self, call: Call, code: ErrorCode) -> None:
        call._finished = True
        self.write(reset(call.stream_id, code))
        self.forget(call)
        call._cancel()

    def fail(self, code: ErrorCode, message: str) -> None:
        """A connection error: GOAWAY with the code, then close."""
        log.warning("closing HTTP/2 connection: %s", message)
        self.server.on_error(f"http2_{code.name.lower()}")
        self.write(goaway(self._last_stream_id, code, message.encode()[:256]))
        for call in list(self.streams.values()):
            call._cancel()
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Start a graceful close: GOAWAY for 'no new streams soon', then a PING to learn when to cut off."""
        if self._draining:
            return
        self._draining = True
        self.write(goaway(MAX_WINDOW, ErrorCode.NO_ERROR) + frame(PING, 0, 0, _SHUTDOWN_PING))

    def abort(self) -> None:
        for call in list(self.streams.values()):
            call.finish(Status.UNAVAILABLE, "server shutting down")
            call._cancel()
        if self.transport is not None:
            if self.writable:
                self.transport.close()  # after the statuses above are written
            else:
                self.transport.abort()  # the peer is not reading: closing would wait for it forever
