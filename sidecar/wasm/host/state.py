"""What the host keeps between calls: streams, logs, metrics, shared data, queues, callouts."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sidecar.wasm.host.abi import LogLevel, MetricType

__all__ = [
    "HeaderList",
    "HttpCall",
    "HttpCallResponse",
    "LocalResponse",
    "LogRecord",
    "Metric",
    "SharedState",
    "StreamState",
]

HeaderList = list[tuple[str, str]]


@dataclass(frozen=True)
class LogRecord:
    level: LogLevel
    message: str
    context_id: int


@dataclass(frozen=True)
class LocalResponse:
    """What the module asked Envoy to send instead of forwarding the request."""

    status: int
    headers: HeaderList
    body: bytes
    details: str
    grpc_status: int | None


@dataclass(frozen=True)
class HttpCallResponse:
    """An answer to a module's proxy_http_call. `headers` should carry `:status`."""

    headers: HeaderList
    body: bytes = b""
    trailers: HeaderList = field(default_factory=list)

    @classmethod
    def of(cls, status: int, body: bytes = b"", headers: HeaderList | None = None) -> HttpCallResponse:
        return cls([(":status", str(status)), *(headers or [])], body)


@dataclass
class HttpCall:
    """A callout the module started and that is not answered yet."""

    token: int
    context_id: int
    upstream: str
    headers: HeaderList
    body: bytes
    trailers: HeaderList
    timeout_ms: int

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class Metric:
    id: int
    type: MetricType
    name: str
    value: int = 0


@dataclass
class StreamState:
    """One HTTP stream as the module sees it. Bodies: `*_sent` went on, `*_buffer` is held by the filter."""

    context_id: int
    request_headers: HeaderList = field(default_factory=list)
    request_trailers: HeaderList = field(default_factory=list)
    response_headers: HeaderList = field(default_factory=list)
    response_trailers: HeaderList = field(default_factory=list)
    request_sent: bytearray = field(default_factory=bytearray)
    request_buffer: bytearray = field(default_factory=bytearray)
    response_sent: bytearray = field(default_factory=bytearray)
    response_buffer: bytearray = field(default_factory=bytearray)
    request_end: bool = False
    response_end: bool = False
    local_response: LocalResponse | None = None
    continue_request: bool = False
    continue_response: bool = False
    closed: bool = False
    done: bool = False


@dataclass
class SharedState:
    """Shared data and queues; Envoy shares them per VM id across plugins, we share them per Plugin."""

    data: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    queues: dict[int, tuple[bytes, int, deque[bytes]]] = field(default_factory=dict)
    queue_ids: dict[bytes, int] = field(default_factory=dict)
