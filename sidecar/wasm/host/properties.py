"""The property tree behind proxy_get_property / proxy_set_property.

Paths arrive as segments joined by NUL (rust-sdk and Go SDK) and are looked up as dotted names.
Values are serialized the way Envoy serializes CEL values for Wasm: strings and bytes raw, integers
as 8-byte little-endian int64, booleans as one byte, string maps in the header-map wire format.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Union

from sidecar.wasm.host.abi import encode_pairs
from sidecar.wasm.host.state import StreamState

__all__ = ["PropertyValue", "Properties", "encode_value"]

PropertyValue = Union[str, bytes, int, bool, float, Mapping[str, str]]


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
        self._set: dict[str, bytes] = {}

    def get(self, path: bytes, stream: StreamState | None) -> bytes | None:
        key = _normalize(path.decode(errors="replace"))
        if key in self._set:
            return self._set[key]
        if key in self._configured:
            return encode_value(self._configured[key])
        if stream is not None:
            value = _derived(stream).get(key)
            if value is not None:
                return encode_value(value)
        return None

    def set(self, path: bytes, value: bytes) -> None:
        self._set[_normalize(path.decode(errors="replace"))] = value


def _normalize(path: str) -> str:
    return path.strip("\0").replace("\0", ".")


def _derived(stream: StreamState) -> dict[str, PropertyValue]:
    """Envoy's request/response attributes, computed from the stream as it is now."""
    req = {k: v for k, v in reversed(stream.request_headers)}
    out: dict[str, PropertyValue] = {
        "request.headers": {k: v for k, v in stream.request_headers if not k.startswith(":")},
        "request.protocol": "HTTP/1.1",
    }
    for name, header in (("path", ":path"), ("host", ":authority"), ("method", ":method"),
                         ("scheme", ":scheme"), ("referer", "referer"), ("useragent", "user-agent"),
                         ("id", "x-request-id")):  # fmt: skip
        if header in req:
            out[f"request.{name}"] = req[header]
    if ":path" in req:
        out["request.url_path"] = req[":path"].split("?", 1)[0]
        out["request.query"] = req[":path"].partition("?")[2]
    resp = {k: v for k, v in reversed(stream.response_headers)}
    if ":status" in resp and resp[":status"].isdigit():
        out["response.code"] = int(resp[":status"])
        out["response.headers"] = {k: v for k, v in stream.response_headers if not k.startswith(":")}
    return out
