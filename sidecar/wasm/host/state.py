"""What the host keeps between calls: streams, logs, metrics, shared data, queues, callouts; and the budget
that bounds how much of it a guest can make the host keep."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from sidecar.wasm.host.abi import LogLevel, MetricType
from sidecar.wasm.host.errors import HostBudgetExceeded

__all__ = [
    "CONNECT_FAILURE_BODY",
    "ENTRY_BYTES",
    "TIMEOUT_BODY",
    "HeaderList",
    "HostBudget",
    "HttpCall",
    "HttpCallResponse",
    "LocalResponse",
    "LogRecord",
    "Metric",
    "SharedState",
    "StreamState",
    "held",
    "held_pairs",
]

HeaderList = list[tuple[str, str]]

# The bodies of the replies Envoy's router makes itself (checked against Envoy 1.40).
CONNECT_FAILURE_BODY = (
    b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
)
TIMEOUT_BODY = b"upstream request timeout"


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

    @classmethod
    def local_reply(cls, status: int, body: bytes) -> HttpCallResponse:
        """A reply Envoy's router makes itself: the status, a text body and its two headers."""
        return cls([(":status", str(status)), ("content-length", str(len(body))), ("content-type", "text/plain")], body)

    @classmethod
    def connect_failure(cls) -> HttpCallResponse:
        """What Envoy delivers when the callout's cluster cannot be connected to (refused, unreachable)."""
        return cls.local_reply(503, CONNECT_FAILURE_BODY)

    @classmethod
    def timeout(cls) -> HttpCallResponse:
        """What Envoy delivers when the callout's timeout passes before the response ends."""
        return cls.local_reply(504, TIMEOUT_BODY)


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
    # Which maps the module may touch now. Envoy hands a header map to the module while its callback runs
    # and keeps it only while that callback stopped iteration (a Continue lets it go): afterwards the map
    # calls answer BAD_ARGUMENT and the request.* properties derived from it are not found.
    held_maps: set[int] = field(default_factory=set)
    # on_done / on_log / on_delete run: every map can be read (Envoy's access-log view), none changed.
    logging: bool = False
    # Stream facts behind the request.*, response.* and upstream.* properties.
    started_ns: int = 0
    request_bytes: int = 0  # request body bytes received so far
    response_bytes: int = 0  # response body bytes sent so far
    response_code: int | None = None
    response_details: str = ""
    upstream_address: str | None = None  # set once an upstream answered
    upstream_attempts: int = 0

    def readable(self, map_type: int) -> bool:
        return map_type in self.held_maps or self.logging


@dataclass
class SharedState:
    """Shared data and queues; Envoy shares them per VM id across plugins, we share them per Plugin.

    CAS tokens come from one counter for all keys, as in Envoy (a token says nothing about its key).
    """

    data: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    queues: dict[int, tuple[bytes, int, deque[bytes]]] = field(default_factory=dict)
    queue_ids: dict[bytes, int] = field(default_factory=dict)
    next_cas: int = 1

    def take_cas(self) -> int:
        cas = self.next_cas
        self.next_cas = (self.next_cas + 1) & 0xFFFFFFFF or 1  # 0 means "no CAS" to set_shared_data
        return cas


# What one more entry costs the host beyond its payload: a list or dict slot, a tuple or a small record.
# The figures are CPython's (measured with tracemalloc), rounded up, so the budget tracks real memory.
ENTRY_BYTES = 128


def held(*objects: object) -> int:
    """Bytes the host holds for these objects (their payloads as CPython stores them) plus one entry."""
    return sum(sys.getsizeof(o) for o in objects) + ENTRY_BYTES


def held_pairs(pairs: Iterable[tuple[str, str]]) -> int:
    return sum(held(k, v) for k, v in pairs)


class HostBudget:
    """The bytes of guest-provided data one VM makes the host keep, against `Limits.host_state_bytes`.

    Host functions charge what they keep before keeping it and refund what they drop or replace. A charge
    can belong to a scope (an HTTP context, a pending callout) whose charges are refunded together when the
    scope ends. A charge past the limit raises HostBudgetExceeded: the guest is unwound and the VM fails.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._scopes: dict[Hashable, int] = {}

    def check(self, size: int, what: str) -> None:
        """Refuse early (before copying guest memory) when `size` more bytes cannot fit."""
        if size < 0 or self.used + size > self.limit:
            raise HostBudgetExceeded(
                f"{what} refused: the host-state budget of {self.limit} bytes (Limits.host_state_bytes) "
                f"is exhausted ({self.used} bytes in use, {size} more needed)"
            )

    def charge(self, size: int, what: str, scope: Hashable = None) -> None:
        if size <= 0:
            self.refund(-size, scope)
            return
        self.check(size, what)
        self.used += size
        if scope is not None:
            self._scopes[scope] = self._scopes.get(scope, 0) + size

    def refund(self, size: int, scope: Hashable = None) -> None:
        if size <= 0:
            return
        if scope is not None:
            held_by_scope = self._scopes.get(scope, 0)
            size = min(size, held_by_scope)
            self._scopes[scope] = held_by_scope - size
        self.used = max(0, self.used - size)

    def release(self, scope: Hashable) -> None:
        """Refund everything charged to `scope` (its HTTP context finished, its callout was answered)."""
        self.used = max(0, self.used - self._scopes.pop(scope, 0))
