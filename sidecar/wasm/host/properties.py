"""The property tree behind proxy_get_property / proxy_set_property, as Envoy 1.40 answers it.

Paths arrive as segments joined by NUL (the SDKs' way) and are looked up as dotted names. Values are
serialized the way Envoy serializes CEL values for Wasm: strings and bytes raw, integers as 8-byte
little-endian int64, booleans as one byte, string maps in the header-map wire format (an empty map as a
zero count), protobuf messages serialized (an empty message is empty).

Where a value comes from, first match wins:
1. values the module set with proxy_set_property (found only by the single segment they were set at);
2. values the caller configured (`Plugin(properties=...)`), by dotted name;
3. values derived from the stream as it is now. Envoy derives the request.* attributes from the request
   header map only while it holds that map (see `StreamState.held_maps`): once the module continued the
   headers they are not found; request.size, request.total_size, the response.* and upstream.* values
   follow what has happened on the stream so far;
4. Envoy's defaults for this host (`ENVOY_DEFAULTS`: route, cluster, listener names and addresses);
5. a whole attribute group (`request`, `xds`, ...) or `filter_state`: SERIALIZATION_FAILURE, as in Envoy.
Anything else is NOT_FOUND, including the pre-`xds.` names (`cluster_name`, `route_name`, `node`, ...)
that Envoy 1.40 no longer answers.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping

from sidecar.wasm.host.abi import MapType, Status, encode_pairs
from sidecar.wasm.host.state import HeaderList, StreamState

__all__ = ["ENVOY_DEFAULTS", "Properties", "PropertyValue", "encode_value"]

PropertyValue = str | bytes | int | bool | float | Mapping[str, str]

# What Envoy answers for a filter on a plain listener and route, with no TLS and no metadata. The names
# (route, cluster, virtual host) are this host's stand-ins: configure the real ones with `properties=`.
ENVOY_DEFAULTS: dict[str, PropertyValue] = {
    "source.address": "127.0.0.1:50000",
    "source.port": 50000,
    "destination.address": "127.0.0.1:10000",
    "destination.port": 10000,
    "connection.id": 1,
    "connection_id": 1,
    "connection.mtls": False,
    "connection.requested_server_name": "",
    "metadata": b"",
    "xds.cluster_name": "upstream",
    "xds.route_name": "route",
    "xds.virtual_host_name": "vhost",
    "xds.listener_direction": 0,
    "xds.filter_chain_name": "",
    "xds.cluster_metadata": b"",
    "xds.route_metadata": b"",
    "xds.listener_metadata": b"",
    # Envoy's Node message carries its build and extension list; the host has no such identity.
    "xds.node": b"",
}
# Whole attribute groups: Envoy cannot serialize them as one value.
_GROUPS = frozenset({"request", "response", "source", "destination", "upstream", "connection", "xds", "filter_state"})
# The upstream's own end of the connection Envoy opened (a stand-in; the port is the kernel's choice).
_UPSTREAM_LOCAL_ADDRESS = "127.0.0.1:40000"
_EMPTY_MAP = b"\0\0\0\0"


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
    return encode_pairs([(k.encode(), v.encode()) for k, v in value.items()]) or _EMPTY_MAP


class Properties:
    """Configured values, values derived from the current stream, and values the module set."""

    def __init__(self, configured: Mapping[str, PropertyValue]) -> None:
        self._configured = {_normalize(k): v for k, v in configured.items()}
        self._set: dict[bytes, bytes] = {}

    def get(self, path: bytes, stream: StreamState | None) -> bytes | Status:
        """The value's bytes, or NOT_FOUND / SERIALIZATION_FAILURE."""
        if b"\0" not in path.strip(b"\0") and path.strip(b"\0") in self._set:
            return self._set[path.strip(b"\0")]
        key = _dotted(path)
        if key is None:
            return Status.NOT_FOUND
        if key in self._configured:
            return encode_value(self._configured[key])
        if stream is not None:
            derived = _derived(stream, key)
            if derived is not None:
                return derived if isinstance(derived, Status) else encode_value(derived)
        if key in ENVOY_DEFAULTS:
            return encode_value(ENVOY_DEFAULTS[key])
        if key in _GROUPS:
            return Status.SERIALIZATION_FAILURE
        return Status.NOT_FOUND

    def set(self, path: bytes, value: bytes) -> None:
        self._set[path.strip(b"\0")] = value

    def module_value(self, path: bytes) -> bytes | None:
        """What the module itself set at `path` (None if it set nothing there)."""
        return self._set.get(path.strip(b"\0"))


def _normalize(path: str) -> str:
    return path.strip("\0").replace("\0", ".")


def _dotted(path: bytes) -> str | None:
    """`request\0path` -> `request.path`. Envoy splits only on NUL: a dotted single segment such as
    `request.path` names no built-in attribute there, so it is not found here either. Header names after
    `request.headers` / `response.headers` may contain anything."""
    segments = path.decode(errors="replace").strip("\0").split("\0")
    if len(segments) == 3 and segments[1] == "headers" and segments[0] in ("request", "response"):
        return ".".join(segments)
    if any("." in segment for segment in segments):
        return None
    return ".".join(segments)


def _header_bytes(headers: HeaderList) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in headers)


def _header_map(headers: HeaderList) -> dict[str, str]:
    """Header name -> value; repeated headers are joined with "," as Envoy's CEL view joins them."""
    out: dict[str, str] = {}
    for k, v in headers:
        out[k] = f"{out[k]},{v}" if k in out else v
    return out


# Envoy's mapping of an HTTP status to a gRPC status for responses that carry none (Grpc::Utility).
_GRPC_FROM_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def _derived(stream: StreamState, key: str) -> PropertyValue | Status | None:
    group, _, name = key.partition(".")
    if group == "request":
        return _request(stream, name)
    if group == "response":
        return _response(stream, name)
    if group == "upstream":
        if name == "request_attempt_count":
            return stream.upstream_attempts
        if stream.upstream_address is None:
            return None
        port = stream.upstream_address.rpartition(":")[2]
        values: dict[str, PropertyValue] = {
            "address": stream.upstream_address,
            "port": int(port) if port.isdigit() else 0,
            "local_address": _UPSTREAM_LOCAL_ADDRESS,
            "transport_failure_reason": "",
        }
        return values.get(name)
    if key == "xds.upstream_host_metadata":
        # Envoy answers NOT_FOUND before an upstream host is chosen and cannot serialize it afterwards.
        return None if stream.upstream_address is None else Status.SERIALIZATION_FAILURE
    return None


def _request(stream: StreamState, name: str) -> PropertyValue | None:
    held = stream.readable(MapType.HTTP_REQUEST_HEADERS)
    headers = stream.request_headers if held else []
    if name == "protocol":
        return "HTTP/1.1"
    if name == "time":
        return stream.started_ns
    if name == "duration":
        # Envoy knows it once the stream is complete (on_log).
        return time.time_ns() - stream.started_ns if stream.logging else None
    if name == "size":
        length = _header_map(headers).get("content-length", "")
        return int(length) if length.isdigit() else stream.request_bytes
    if name == "total_size":
        return stream.request_bytes + _header_bytes(headers)
    if name == "headers":
        return _header_map(headers)
    if not held:
        return None
    if name.startswith("headers."):
        return _header_map(headers).get(name[len("headers.") :])
    first = dict(reversed(headers))
    path = first.get(":path")
    from_headers: dict[str, str | None] = {
        "path": path,
        "url_path": None if path is None else path.split("?", 1)[0],
        "query": None if path is None else path.partition("?")[2],
        "host": first.get(":authority"),
        "scheme": first.get(":scheme"),
        "method": first.get(":method"),
        "referer": first.get("referer"),
        "useragent": first.get("user-agent"),
        "id": first.get("x-request-id"),
    }
    return from_headers.get(name)


def _response(stream: StreamState, name: str) -> PropertyValue | None:
    held = stream.readable(MapType.HTTP_RESPONSE_HEADERS)
    headers = stream.response_headers if held else []
    if name == "flags":
        return 0
    if name == "size":
        return stream.response_bytes
    if name == "total_size":
        return stream.response_bytes + _header_bytes(headers)
    if name == "headers":
        return _header_map(headers)
    if name == "trailers":
        return _header_map(stream.response_trailers if stream.readable(MapType.HTTP_RESPONSE_TRAILERS) else [])
    if name.startswith("headers."):
        return _header_map(headers).get(name[len("headers.") :])
    if stream.response_code is None:
        return None
    if name == "code":
        return stream.response_code
    if name == "code_details":
        return stream.response_details
    if name == "grpc_status":
        status = _header_map(headers).get("grpc-status", "")
        return int(status) if status.isdigit() else _GRPC_FROM_HTTP.get(stream.response_code, 2)
    return None
