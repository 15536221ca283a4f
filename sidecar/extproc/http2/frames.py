"""HTTP/2 frames (RFC 9113 section 6): the frame header, the frames this server writes, its SETTINGS.

Only encoding and the constants both directions share; reading frames is the connection's job
(`connection.py`), which parses the header with `FRAME_HEAD` in place, without copies.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import TypeVar

__all__ = [
    "CONNECTION_WINDOW",
    "DEFAULT_WINDOW",
    "MAX_CONCURRENT_STREAMS",
    "MAX_FRAME",
    "MAX_HEADER_LIST",
    "MAX_WINDOW",
    "PREFACE",
    "STREAM_WINDOW",
    "ErrorCode",
    "Http2Error",
    "frame",
    "goaway",
    "hpack_int",
    "reset",
    "server_settings",
    "unpad",
    "window_update",
]

Payload = TypeVar("Payload", bytes, memoryview)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

FRAME_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
U32 = struct.Struct(">I")
SETTING = struct.Struct(">HI")

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
#: What this server advertises. Windows are generous because the peer is local and a BUFFERED body
#: arrives as one message; credit is still only returned as the handler consumes messages.
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 64 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_HEADER_LIST = 64 * 1024
MAX_CONCURRENT_STREAMS = 1024
#: SETTINGS entries accepted in one frame.
MAX_SETTINGS = 64
# The SETTINGS identifiers this server reads or sends.
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6


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


class Http2Error(Exception):
    """A connection error (RFC 9113 section 5.4.1): the connection ends with GOAWAY and this code.

    `reason` names the limit a peer broke, for the metrics; by default the code's name."""

    def __init__(self, code: ErrorCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or code.name.lower()


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def reset(stream_id: int, code: ErrorCode) -> bytes:
    return frame(RST_STREAM, 0, stream_id, U32.pack(code))


def goaway(last_stream_id: int, code: ErrorCode, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, U32.pack(last_stream_id) + U32.pack(code) + debug)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, U32.pack(increment))


def server_settings() -> bytes:
    """This server's SETTINGS, then the connection window raised to what it advertises."""
    settings = b"".join(
        SETTING.pack(key, value)
        for key, value in (
            (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME),
            (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
        )
    )
    return frame(SETTINGS, 0, 0, settings) + window_update(0, CONNECTION_WINDOW - DEFAULT_WINDOW)


def unpad(flags: int, payload: Payload) -> Payload:
    """A DATA or HEADERS payload without its padding."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise Http2Error(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


def hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 section 5.1)."""
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
