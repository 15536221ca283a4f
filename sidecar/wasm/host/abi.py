"""The proxy-wasm ABI surface: versions, enums and the header-map wire format.

Values follow the spec (proxy-wasm/spec abi-versions v0.1.0 .. v0.2.1) and Envoy's cpp host.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence

from sidecar.wasm.host.errors import WasmAbiError

__all__ = [
    "AbiVersion",
    "Action",
    "BufferType",
    "LogLevel",
    "MapType",
    "MetricType",
    "Status",
    "StreamType",
    "decode_pairs",
    "detect_abi",
    "encode_pairs",
]

_MARKER = "proxy_abi_version_"


class AbiVersion(enum.Enum):
    V0_1_0 = "0_1_0"
    V0_2_0 = "0_2_0"
    V0_2_1 = "0_2_1"
    # Higress' fork marker; its host surface is 0.2.1 plus extras we do not need.
    V0_2_100 = "0_2_100"

    @property
    def legacy(self) -> bool:
        return self is AbiVersion.V0_1_0


def detect_abi(export_names: Iterable[str]) -> AbiVersion:
    markers = [name[len(_MARKER) :] for name in export_names if name.startswith(_MARKER)]
    if not markers:
        raise WasmAbiError("module exports no proxy_abi_version_* marker: not a proxy-wasm module")
    known = {v.value: v for v in AbiVersion}
    for marker in markers:
        if marker in known:
            return known[marker]
    raise WasmAbiError(f"unknown proxy-wasm ABI version {markers[0]!r} (supported: {', '.join(known)})")


class Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    INTERNAL_FAILURE = 10
    BROKEN_CONNECTION = 11
    UNIMPLEMENTED = 12


class LogLevel(enum.IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class Action(enum.IntEnum):
    """What a stream callback returned. SDKs return Envoy's richer enums, so the raw value is kept."""

    CONTINUE = 0
    PAUSE = 1  # StopIteration / StopIterationAndBuffer
    CONTINUE_AND_END_STREAM = 2  # headers; for body: StopIterationAndWatermark
    STOP_ALL_ITERATION_AND_BUFFER = 3  # headers; for body: StopIterationNoBuffer
    STOP_ALL_ITERATION_AND_WATERMARK = 4


class BufferType(enum.IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_CALL_MESSAGE = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    FOREIGN_FUNCTION_ARGUMENTS = 8


class MapType(enum.IntEnum):
    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_CALL_INITIAL_METADATA = 4
    GRPC_CALL_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class StreamType(enum.IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType(enum.IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


# Envoy's cpp host refuses maps beyond these (include/proxy-wasm/limits.h).
_MAX_PAIRS_BYTES = 1 << 20
_MAX_PAIRS = 1024


def encode_pairs(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """u32 count, count x (u32 key_len, u32 value_len), then each `key \\0 value \\0`, little-endian."""
    if not pairs:
        return b""
    head = [struct.pack("<I", len(pairs))]
    tail: list[bytes] = []
    for key, value in pairs:
        head.append(struct.pack("<II", len(key), len(value)))
        tail.extend((key, b"\0", value, b"\0"))
    return b"".join(head) + b"".join(tail)


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """Inverse of encode_pairs; None when malformed (the cpp host then treats the map as unusable)."""
    if not data:
        return []
    if len(data) < 4 or len(data) > _MAX_PAIRS_BYTES:
        return None
    (count,) = struct.unpack_from("<I", data, 0)
    if count > _MAX_PAIRS or 4 + 8 * count > len(data):
        return None
    sizes = [struct.unpack_from("<II", data, 4 + 8 * i) for i in range(count)]
    pos = 4 + 8 * count
    out: list[tuple[bytes, bytes]] = []
    for klen, vlen in sizes:
        end = pos + klen + 1 + vlen + 1
        if end > len(data) or data[pos + klen] != 0 or data[end - 1] != 0:
            return None
        out.append((bytes(data[pos : pos + klen]), bytes(data[pos + klen + 1 : end - 1])))
        pos = end
    return out if pos == len(data) else None
