"""The server side of one HTTP/2 connection: frames in, calls opened, flow control and shutdown.

Reads frames in place from what the socket delivered (a frame bigger than one read is joined once),
enforces the connection's limits (frame and header sizes, concurrent streams, flow-control windows, the
receive budgets of the connection and of the process, floods of frames that do no work, the handshake
and idle timeouts: `limits.py`) and turns every violation into GOAWAY (a connection error) or RST_STREAM
(a stream error). Each gRPC call runs its handler in a task of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Protocol, cast

import hpack

from sidecar.config import Limits
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
    PADDED,
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
from sidecar.extproc.http2.limits import CALL_COST, FloodGuard, ReceiveBudget, largest_holder
from sidecar.extproc.status import CallError, Status

#: SO_SNDBUF asked for on a Unix socket (the kernel doubles it for its bookkeeping, up to net.core.wmem_max).
#: Linux's default, 208 KiB, takes a fifth of a FULL_DUPLEX answer to one of Envoy's 1 MiB chunks: the rest
#: waited in the event loop's queue, which paused reading from Envoy, and went out in five more rounds of
#: wake-up and write on both sides. With this, one write hands the kernel a whole answer (docs/benchmarks.md).
#: TCP is left alone: setting it would turn off the kernel's own tuning of the buffer.
UNIX_SEND_BUFFER = 2 * 1024 * 1024

__all__ = ["Connection", "Endpoint"]

log = logging.getLogger("sidecar.http2")

_SHUTDOWN_PING = b"drain\0\0\0"
#: Seconds a failed connection is kept half-closed so its GOAWAY arrives (at most the handshake timeout).
_LINGER = 1.0


class Endpoint(Protocol):
    """What a connection needs from the server that accepted it (`server.Http2Server`)."""

    @property
    def routes(self) -> dict[str, Handler]: ...

    @property
    def max_message(self) -> int: ...

    @property
    def limits(self) -> Limits: ...

    @property
    def budget(self) -> ReceiveBudget: ...

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
        self.limits = server.limits
        #: The process's receive budget, shared with every other connection of the server.
        self.budget = server.budget
        self.guard = FloodGuard(server.limits, self.loop.time)
        #: Frames that did work, either way (data, streams opened): what the flood guard weighs floods against.
        self.progress = 0
        self._settings_seen = False
        self._last_active = 0.0
        #: The handshake timer, then the idle timer.
        self._timer: asyncio.TimerHandle | None = None
        #: Refused or failed: what the peer still sends is read and dropped until the connection closes.
        self._discarding = False
        #: Runs while a header block is split over CONTINUATION frames.
        self._block_timer: asyncio.TimerHandle | None = None
        #: The start of a frame (or of the preface) that the next reads complete, and its whole size.
        self._pending = bytearray()
        self._pending_needed = 0
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
        if len(self.server.connections) >= self.limits.max_connections:
            # Refused before it costs anything: no decoder work, no timer. GOAWAY says why, for whoever debugs it.
            log.warning("refusing a connection: %d are open (limits.max_connections)", len(self.server.connections))
            self.server.on_error("http2_too_many_connections")
            self.transport.write(
                frame(SETTINGS, 0, 0) + goaway(0, ErrorCode.ENHANCE_YOUR_CALM, b"too many connections")
            )
            self._linger()
            return
        self.server.connections.add(self)
        _widen_send_buffer(self.transport)
        self.write(server_settings())
        self._timer = self.loop.call_later(self.limits.handshake_timeout, self._handshake_expired)
        if self.server.stopping:  # accepted just as the server began to stop: drain it as well
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for timer in (self._timer, self._block_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._block_timer = None
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
        if self._discarding:
            return
        self._last_active = self.loop.time()
        view = memoryview(data)
        while self._pending:
            # A frame (or the preface) began in an earlier read: complete just that one with the head of this
            # read, then parse the rest of it in place (joining whole reads would copy every byte once more).
            pending = self._pending
            missing = self._pending_needed - len(pending)
            if len(view) < missing:
                pending += view  # bytes, not a list of pieces: a peer trickling bytes costs no objects
                return
            pending += view[:missing]
            self._pending = bytearray()
            view = view[missing:]
            if not self._parse(memoryview(pending)):
                return
        if view:
            self._parse(view)

    def _parse(self, data: memoryview) -> bool:
        """The preface and the frames in `data`, an incomplete one kept for the next read. DATA payloads are
        views of `data` (no copy: the call copies what it keeps). False once the connection is done for."""
        if not self._preface_seen:
            if len(data) < len(PREFACE):
                if not PREFACE.startswith(bytes(data)):
                    self._close_unspoken()
                    return False
                self._keep(data, len(PREFACE))
                return True
            if data[: len(PREFACE)] != PREFACE:
                self._close_unspoken()
                return False
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
                    return False
        except Http2Error as exc:
            self.fail(exc.code, str(exc), exc.reason)
            return False
        if position < size:
            self._keep(data[position:], needed)
        return True

    def _keep(self, rest: memoryview, needed: int) -> None:
        self._pending = bytearray(rest)  # a copy: nothing here keeps a read's buffer alive
        self._pending_needed = needed

    def _close_unspoken(self) -> None:
        log.warning("closing a connection that did not start with the HTTP/2 preface (is the client gRPC?)")
        if self.transport is not None:
            self.transport.close()

    # -- frames

    def _on_frame(self, kind: int, flags: int, stream_id: int, view: memoryview) -> None:
        if self._continuation is not None and (kind != CONTINUATION or stream_id != self._continuation[0]):
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        if not self._settings_seen:
            self._on_first_frame(kind, flags)
        if kind == DATA:
            self._on_data(flags, stream_id, view)
            return
        payload = bytes(view)  # small, and kept or decoded: a copy of its own, not a view of the read
        if kind == HEADERS:
            self._on_headers(flags, stream_id, payload)
            return
        if kind != CONTINUATION and kind != GOAWAY:
            self.guard.control_frame(self.progress)
        if kind == WINDOW_UPDATE:
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
                started = call._started
                call._cancel()
                self.forget(call)
                if not started:
                    self.guard.premature_end()
        elif kind == GOAWAY:
            self._draining = self._final_goaway = True
            if not self.streams and self.transport is not None:
                self.transport.close()
        elif kind == CONTINUATION:
            if self._continuation is None:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            if not payload and not flags & END_HEADERS:
                self.guard.empty_frame(self.progress)
            block = self._continuation[2]
            block += payload
            if len(block) > MAX_HEADER_LIST:
                raise Http2Error(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
            if flags & END_HEADERS:
                stream, end_stream, _ = self._continuation
                self._continuation = None
                if self._block_timer is not None:
                    self._block_timer.cancel()
                    self._block_timer = None
                self._on_header_block(stream, end_stream, bytes(block))
        elif kind == PUSH_PROMISE:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        elif kind == PRIORITY and len(payload) != 5:
            raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "malformed PRIORITY")
        # Other frame types are extensions: ignored, as RFC 9113 requires (but counted as control frames).

    def _on_first_frame(self, kind: int, flags: int) -> None:
        """The client preface ends with a SETTINGS frame (RFC 9113 section 3.4); the handshake is done."""
        if kind != SETTINGS or flags & ACK:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "the client preface must end with a SETTINGS frame")
        self._settings_seen = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        if self.limits.idle_timeout:
            self._timer = self.loop.call_later(self.limits.idle_timeout, self._idle_check)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.transport is not None and not self._settings_seen:
            timeout = self.limits.handshake_timeout
            self.fail(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"no client preface and SETTINGS within {timeout:g}s (limits.handshake_timeout)",
                "handshake_timeout",
            )

    def _block_expired(self) -> None:
        self._block_timer = None
        if self.transport is not None and self._continuation is not None:
            timeout = self.limits.handshake_timeout
            self.fail(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"a header block was not complete within {timeout:g}s (limits.handshake_timeout)",
                "header_timeout",
            )

    def _idle_check(self) -> None:
        """Idle: no open streams and no frames for `idle_timeout` seconds. Then a graceful GOAWAY, as on stop."""
        self._timer = None
        if self.transport is None or self._draining:
            return
        timeout = self.limits.idle_timeout
        now = self.loop.time()
        if self.streams:
            self._last_active = now  # busy: idleness starts no earlier than now
        idle_for = now - self._last_active
        if idle_for < timeout:
            self._timer = self.loop.call_later(timeout - idle_for, self._idle_check)
            return
        log.info("closing an idle HTTP/2 connection (limits.idle_timeout %gs)", timeout)
        self.drain()
        # A peer that does not answer the draining PING in time is not waited for.
        self._timer = self.loop.call_later(self.limits.handshake_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        self._timer = None
        if self.transport is not None and not self._final_goaway:
            self.abort()

    def _reply(self, data: bytes) -> None:
        """Write what the peer asked for (an ack, a reset), unless it leaves too many such replies unread."""
        transport = self.transport
        if transport is not None:
            self.guard.reply(transport.get_write_buffer_size())
            transport.write(data)

    def _relieve(self, room: int) -> bool:
        """End the largest holders until `room` more bytes fit the connection's and the process's budgets.

        Largest first, so one greedy call gives way rather than the peer's credit being held back (which
        could leave calls waiting on one another's partial messages); False when no call holds more than
        `room`, and ending one would free nothing a newcomer could use."""
        while self.buffered + room > self.limits.connection_receive_buffer:
            largest = largest_holder(self.streams.values())
            if largest is None or largest._buffered <= room:
                return False
            largest.abandon(Status.RESOURCE_EXHAUSTED, "the connection's receive buffer is full")
        budget = self.budget
        while budget.used + room > budget.limit:
            largest = largest_holder(call for conn in self.server.connections for call in conn.streams.values())
            if largest is None or largest._buffered <= room:
                return False
            largest.abandon(Status.RESOURCE_EXHAUSTED, "the server's receive buffer is full")
        return True

    def _on_data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        flow_length = len(payload)
        data = unpad(flags, payload) if flags & PADDED else payload
        if data:
            self.progress += 1
        elif not flags & END_STREAM:
            self.guard.empty_frame(self.progress)
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
        call._on_data(data, flow_length, bool(flags & END_STREAM))
        if self.buffered > self.limits.connection_receive_buffer or self.budget.used > self.budget.limit:
            self._relieve(0)

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
        if not payload and not flags & END_STREAM:
            self.guard.empty_frame(self.progress)
        if flags & END_HEADERS:
            self._on_header_block(stream_id, bool(flags & END_STREAM), payload)
        else:
            self._continuation = (stream_id, bool(flags & END_STREAM), bytearray(payload))
            # A header block left open blocks every other frame: it gets the handshake's time to end.
            self._block_timer = self.loop.call_later(self.limits.handshake_timeout, self._block_expired)

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
        self.guard.stream_opened()
        self.progress += 1
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
            answer = frame(HEADERS, END_STREAM | END_HEADERS, stream_id, b"\x00\x07:status\x03415")
            self._reply(answer if end_stream else answer + reset(stream_id, ErrorCode.NO_ERROR))
            self.guard.premature_end()
            return
        if len(self.streams) >= MAX_CONCURRENT_STREAMS or not self._relieve(CALL_COST):
            # Over the peer's stream limit, or no room in the budgets even after the largest holder gave way.
            self._reply(reset(stream_id, ErrorCode.REFUSED_STREAM))
            self.guard.premature_end()
            return
        call = Call(self, stream_id, path.decode("latin-1"), metadata, CALL_COST)
        call._remote_done = end_stream
        self.streams[stream_id] = call
        handler = self.server.routes.get(call.path)
        if handler is None:
            call.finish(Status.UNIMPLEMENTED, f"unknown method {call.path[:100]}")
            self.guard.premature_end()
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
        self._reply(frame(SETTINGS, ACK, 0))
        self.send_window.wake()

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) != 8:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "malformed PING")
        if not flags & ACK:
            self._reply(frame(PING, ACK, 0, payload))
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

    def writelines(self, pieces: Iterable[bytes | memoryview]) -> None:
        """Write pieces as one: uvloop hands them to one writev, keeping views of what it cannot send yet."""
        if self.transport is not None:
            self.transport.writelines(pieces)

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
        self._reply(reset(call.stream_id, code))
        self.forget(call)
        call._cancel()

    def fail(self, code: ErrorCode, message: str, reason: str = "") -> None:
        """A connection error: GOAWAY with the code, then close. `reason` names it in the metrics."""
        log.warning("closing HTTP/2 connection: %s", message)
        self.server.on_error(f"http2_{reason or code.name.lower()}")
        self.write(goaway(self._last_stream_id, code, message.encode()[:256]))
        for call in list(self.streams.values()):
            call._cancel()
        self._linger()

    def _linger(self) -> None:
        """Close after the last frame (a GOAWAY) without losing it: shut the sending side, drop what the peer
        still sends, and close for good a moment later. Closing at once with its bytes unread would reset the
        connection, and the peer could lose the GOAWAY that says why."""
        transport, self.transport = self.transport, None  # nothing more is written, nothing more is read
        self._discarding = True
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()  # TLS: no half-close
        self.loop.call_later(min(_LINGER, self.limits.handshake_timeout), transport.abort)

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


def _widen_send_buffer(transport: asyncio.Transport) -> None:
    """UNIX_SEND_BUFFER on a Unix socket; a tuning only, so a kernel that refuses it changes nothing else."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
