"""The property tree behind proxy_get_property / proxy_set_property.

Paths arrive as segments joined by NUL (rust-sdk and Go SDK) and are looked up as dotted names.
Values are serialized the way Envoy serializes CEL values for Wasm: strings and bytes raw, integers
as 8-byte little-endian int64, booleans as one byte, string maps in the header-map wire format.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from sidecar.wasm.host.abi import encode_pairs
from sidecar.wasm.host.state import StreamState

__all__ = ["Properties", "PropertyValue", "encode_value"]

PropertyValue = str | bytes | int | bool | float | Mapping[str, str]


def encode_value(value: PropertyValue) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return struct.pack("<q", value)
    if isinstance(value, float):
        return struct.pack("<d", value)
    return encode_pairs([(k.encode(), v.encode()) for k, v in value.items()])


class Properties:
    """Configured values, values derived from the current stream, and values the module set."""

    def __init__(self, configured: Mapping[str, PropertyValue]) -> None:
        self._configured = {_normalize(k): v for k, v in configured.items()}
        self._set: dict[bytes, bytes] = {}

    def get(self, path: bytes, stream: StreamState | None) -> bytes | None:
        if path in self._set:
            return self._set[path]
        key = _dotted(path)
        if key is None:
            return None
        if key in self._configured:
            return encode_value(self._configured[key])
        if stream is not None:
            value = _derived(stream).get(key)
            if value is not None:
                return encode_value(value)
        return None

    def set(self, path: bytes, value: bytes) -> None:
        self._set[path] = value

    def module_value(self, path: bytes) -> bytes | None:
        """What the module itself set at `path` (None if it set nothing there)."""
        return self._set.get(path)


def _normalize(path: str) -> str:
    return path.strip("\0").replace("\0", ".")


def _dotted(path: bytes) -> str | None:
    """`request\0path` -> `request.path`. Envoy splits only on NUL: a dotted single segment such as
    `request.path` names no built-in attribute there, so it is not found here either."""
    segments = path.decode(errors="replace").strip("\0").split("\0")
    if any("." in segment for segment in segments):
        return None
    return ".".join(segments)


def _derived(stream: StreamState) -> dict[str, PropertyValue]:
    """Envoy's request/response attributes, computed from the stream as it is now."""
    req = dict(reversed(stream.request_headers))
    out: dict[str, PropertyValue] = {
        "request.headers": {k: v for k, v in stream.request_headers if not k.startswith(":")},
        "request.protocol": "HTTP/1.1",
    }
    names = {
        "path": ":path",
        "host": ":authority",
        "method": ":method",
        "scheme": ":scheme",
        "referer": "referer",
        "useragent": "user-agent",
        "id": "x-request-id",
    }
    for name, header in names.items():
        if header in req:
            out[f"request.{name}"] = req[header]
    if ":path" in req:
        out["request.url_path"] = req[":path"].split("?", 1)[0]
        out["request.query"] = req[":path"].partition("?")[2]
    resp = dict(reversed(stream.response_headers))
    if resp.get(":status", "").isdigit():
        out["response.code"] = int(resp[":status"])
        out["response.headers"] = {k: v for k, v in stream.response_headers if not k.startswith(":")}
    return out
