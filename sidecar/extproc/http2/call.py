"""One gRPC call on one HTTP/2 stream: length-prefixed messages in, messages and a status out.

Received bytes count against the call's receive window (credit goes back only as the handler reads
messages) and against the receive budgets of its connection and of the process (what they hold in
messages not yet read, and a fixed cost per open call); the connection decides what happens when a
budget is exceeded.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from sidecar.extproc.http2.flow import ReceiveWindow, SendWindow
from sidecar.extproc.http2.frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    FRAME_HEAD,
    HEADERS,
    STREAM_WINDOW,
    ErrorCode,
    frame,
    hpack_int,
    reset,
    window_update,
)
from sidecar.extproc.status import Status

if TYPE_CHECKING:
    from sidecar.extproc.http2.limits import ReceiveBudget

__all__ = ["MESSAGE_COST", "Call", "Carrier", "Handler"]

log = logging.getLogger("sidecar.http2")

Handler = Callable[["Call"], Awaitable[None]]

_MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, length
#: What one received message costs beyond its bytes (Python objects), for the connection's buffer budget.
MESSAGE_COST = 96
#: A message smaller than this is joined into one write (cheaper than handing the socket a list of pieces);
#: a larger one is handed over as views of its pieces, without copies.
_JOIN_BELOW = 16 * 1024


class _Limits(Protocol):
    @property
    def max_message(self) -> int: ...

    @property
    def on_error(self) -> Callable[[str], None]: ...


class Carrier(Protocol):
    """What a call needs from the connection that carries it (`connection.Connection`)."""

    #: Bytes held in received messages not yet read, over every call of the connection (its budget).
    buffered: int
    #: Frames that did work (for the flood guard): a call counts the DATA frames it sends.
    progress: int

    @property
    def budget(self) -> ReceiveBudget: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def server(self) -> _Limits: ...

    @property
    def send_window(self) -> SendWindow: ...

    @property
    def peer_initial_window(self) -> int: ...

    @property
    def peer_max_frame(self) -> int: ...

    @property
    def writable(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def writelines(self, pieces: Iterable[bytes | memoryview]) -> None: ...

    def forget(self, call: Call) -> None: ...

    def reset_stream(self, call: Call, code: ErrorCode) -> None: ...


def _take(parts: deque[memoryview], count: int, out: list[bytes | memoryview]) -> None:
    """Move the first `count` bytes of `parts` to `out`, as views (no copy)."""
    while count:
        part = parts[0]
        if len(part) <= count:
            out.append(part)
            parts.popleft()
            count -= len(part)
        else:
            out.append(part[:count])
            parts[0] = part[count:]
            count = 0


def _frames(
    parts: deque[memoryview], count: int, stream_id: int, max_frame: int, out: list[bytes | memoryview]
) -> None:
    """DATA frames (head, then views of `parts`) for the first `count` bytes of `parts`, each at most
    `max_frame` long. A 1 MiB answer is 64 frames at Envoy's 16 KiB: the full frames share one head, and a
    frame inside one piece is one slice of it."""
    full = FRAME_HEAD.pack(max_frame << 8 | DATA, 0, stream_id)
    while count:
        length = max_frame if count >= max_frame else count
        out.append(full if length == max_frame else FRAME_HEAD.pack(length << 8 | DATA, 0, stream_id))
        part = parts[0]
        if len(part) > length:
            out.append(part[:length])
            parts[0] = part[length:]
        else:
            _take(parts, length, out)
        count -= length


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as 'literal without indexing, new name': leaves the peer's dynamic table alone."""
    return b"\x00" + hpack_int(len(name), 7, 0) + name + hpack_int(len(value), 7, 0) + value


def _grpc_message(message: str) -> bytes:
    """Percent-encode as gRPC requires for grpc-message; capped so trailers fit one frame."""
    raw = message.encode("utf-8", "replace")[:1024]
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


# `:status: 200` is static-table entry 8; content-type is entry 31, sent as a literal with that name.
_RESPONSE_HEADERS = b"\x88" + hpack_int(31, 4, 0) + hpack_int(16, 7, 0) + b"application/grpc"
_TRAILERS_OK = _literal(b"grpc-status", b"0")


def _status_block(status: Status, message: str) -> bytes:
    block = _literal(b"grpc-status", str(int(status)).encode())
    if message:
        block += _literal(b"grpc-message", _grpc_message(message))
    return block


class Call:
    """One gRPC call on one HTTP/2 stream: length-prefixed messages in, messages and a status out."""

    __slots__ = (
        "_budget",
        "_buffered",
        "_conn",
        "_finished",
        "_headers_sent",
        "_messages",
        "_midway",
        "_partial",
        "_partial_needed",
        "_receive",
        "_remote_done",
        "_started",
        "_waiter",
        "metadata",
        "path",
        "send_window",
        "stream_id",
        "task",
    )

    def __init__(self, conn: Carrier, stream_id: int, path: str, metadata: dict[str, str], cost: int = 0) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.path = path
        #: Request headers other than pseudo-headers, names lower-case, values decoded as latin-1.
        self.metadata = metadata
        #: Complete messages not yet read: bytes, or a view of the buffer a large message was assembled in.
        self._messages: deque[bytes | memoryview] = deque()
        #: The start of a message whose end has not arrived yet (its prefix included), and its whole size.
        self._partial = bytearray()
        self._partial_needed = 0
        self._waiter: asyncio.Future[None] | None = None
        self._remote_done = False
        self._finished = False
        self._headers_sent = False
        self._receive = ReceiveWindow(STREAM_WINDOW)
        #: The handler asked for a message: a reset from now on does not count as a rapid reset.
        self._started = False
        self._budget = conn.budget
        #: Bytes this call holds in received messages and the partial one, plus what an open call costs,
        #: counted against the connection's and the process's budgets.
        self._buffered = 0
        self._hold(cost)
        self.send_window = SendWindow(conn.peer_initial_window)
        #: A message is partly sent: nothing but a reset may follow.
        self._midway = False
        self.task: asyncio.Task[None] | None = None

    # -- receiving

    async def read(self) -> bytes | memoryview | None:
        """The next message, or None once the client has half-closed and every message was read.

        One reader per call: the handler."""
        self._started = True
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
        self._hold(-len(message) - MESSAGE_COST)
        if not messages:
            self._return_credit()
        return message

    def _hold(self, size: int) -> None:
        """Count bytes held for the handler, against this call and its connection's buffer budget."""
        self._buffered += size
        self._conn.buffered += size
        self._budget.used += size

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _return_credit(self) -> None:
        # Credit goes back only once every complete message was handed to the handler: what is buffered
        # is bounded by the window plus one partial message.
        if self._receive.credit_due and not self._remote_done and not self._finished:
            self._conn.write(window_update(self.stream_id, self._receive.return_credit()))

    def _on_data(self, payload: memoryview, flow_length: int, end_stream: bool) -> None:
        """A DATA frame's payload (padding removed) for this call: a view of what the socket delivered,
        which is copied (once) for whatever is kept."""
        if self._remote_done:
            self._conn.reset_stream(self, ErrorCode.STREAM_CLOSED)
            return
        if not self._receive.consume(flow_length):
            self._conn.reset_stream(self, ErrorCode.FLOW_CONTROL_ERROR)
            return
        if not payload and not end_stream:
            return  # costs the sender nothing, so it must cost this side nothing either
        partial = self._partial
        if partial:
            # A message spread over many frames is assembled here, one copy of each payload.
            partial += payload
            self._hold(len(payload))
            if len(partial) < self._partial_needed and not end_stream:
                if not self._messages:
                    self._return_credit()  # the rest of this message cannot arrive without it
                return
            self._partial = bytearray()
            self._hold(-len(partial))
            received = self._deframe(memoryview(partial), assembled=True)
        else:
            received = self._deframe(payload, assembled=False)
        if received is None:
            return
        if end_stream:
            self._remote_done = True
            if self._partial:
                self.abandon(Status.INTERNAL, "stream ended inside a message")
                return
            self._wake()
        elif received:
            self._wake()
        if not self._messages:
            self._return_credit()

    def _deframe(self, data: memoryview, assembled: bool) -> bool | None:
        """Length-prefixed messages out of `data` for the reader, the rest kept as the partial message.

        A message that `data` was `assembled` for is handed on as a view of it when little else is in it (at
        most an eighth of its size more, the start of the next message, which is copied out): what it holds
        beyond its counted size is that and the buffer's growth slack. Any other message is copied out of
        `data`, which may be a read's buffer.
        Whether a message arrived; None when one cannot be taken and the call was ended."""
        size = len(data)
        position = 0
        needed = 5
        messages = self._messages
        received = False
        while size - position >= 5:
            compressed, length = _MESSAGE_PREFIX.unpack_from(data, position)
            if compressed:
                self.abandon(Status.INTERNAL, "compressed messages are not supported")
                return None
            if length > self._conn.server.max_message:
                self.abandon(Status.RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds the limit")
                return None
            end = position + 5 + length
            if end > size:
                needed = 5 + length
                break
            if assembled and position == 0 and size - end <= end >> 3:
                messages.append(data[5:end])
            else:
                messages.append(data[position + 5 : end].tobytes())
            self._hold(length + MESSAGE_COST)
            received = True
            position = end
        if position < size:
            self._partial = bytearray(data[position:])
            self._partial_needed = needed
            self._hold(size - position)
        return received

    def _on_remote_end(self) -> None:
        self._remote_done = True
        if self._partial:  # trailers ended the stream inside a message
            self.abandon(Status.INTERNAL, "stream ended inside a message")
            return
        self._wake()

    # -- sending

    async def send(self, message: bytes | memoryview, *more: bytes | memoryview) -> None:
        """Send one message: `message`, or `message` and `more` end to end (joined on the wire, not in memory).

        Waits only when flow control or the socket buffer asks it to. A large message goes to the socket as
        views of the caller's bytes, never copied here: the caller must not change them (bytes cannot be).
        One sender at a time per call. Cancelled half-way, the message cannot be completed: the stream
        is reset instead, so the client never parses a cut message as the start of the next."""
        if self._finished:
            return
        conn = self._conn
        window, conn_window = self.send_window, conn.send_window
        head = b""
        if not self._headers_sent:
            self._headers_sent = True
            head = frame(HEADERS, END_HEADERS, self.stream_id, _RESPONSE_HEADERS)
        length = len(message)
        for piece in more:
            length += len(piece)
        size = 5 + length
        prefix = _MESSAGE_PREFIX.pack(0, length)
        if size <= conn.peer_max_frame and size <= window.size and size <= conn_window.size and conn.writable:
            window.size -= size
            conn_window.size -= size
            conn.progress += 1
            first = head + FRAME_HEAD.pack(size << 8 | DATA, 0, self.stream_id) + prefix
            if size <= _JOIN_BELOW:
                conn.write(b"".join((first, message, *more)))
            else:
                conn.writelines((first, message, *more))
            return
        parts = deque(memoryview(piece) for piece in (prefix, message, *more) if piece)
        out: list[bytes | memoryview] = [head] if head else []
        remaining = size
        try:
            while remaining and not self._finished:
                allowed = min(remaining, window.size, conn_window.size)
                if allowed <= 0 or not conn.writable:
                    if out:
                        conn.writelines(out)
                        out = []
                    if window.size <= 0:
                        await window.wait()
                    else:
                        await conn_window.wait()
                    continue
                window.size -= allowed
                conn_window.size -= allowed
                remaining -= allowed
                _frames(parts, allowed, self.stream_id, conn.peer_max_frame, out)
                conn.progress += 1
                conn.writelines(out)
                out = []
                self._midway = remaining > 0
        except asyncio.CancelledError:
            if self._midway:
                self.finish()  # a reset, see finish()
            raise

    def finish(self, status: Status = Status.OK, message: str = "") -> None:
        """Send the status as trailers (or a trailers-only response) and close the stream."""
        if self._finished:
            return
        self._finished = True
        conn = self._conn
        if self._midway:  # after a cut message no status can be read correctly: reset instead
            conn.write(reset(self.stream_id, ErrorCode.CANCEL))
            conn.forget(self)
            return
        if status is Status.OK and self._headers_sent and not message:
            block = _TRAILERS_OK
        else:
            block = (b"" if self._headers_sent else _RESPONSE_HEADERS) + _status_block(status, message)
        out = frame(HEADERS, END_STREAM | END_HEADERS, self.stream_id, block)
        if not self._remote_done:  # the client may still be sending: tell it to stop
            out += reset(self.stream_id, ErrorCode.NO_ERROR)
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
        self._partial = bytearray()
        self._hold(-self._buffered)
