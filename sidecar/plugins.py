"""The public plugin API.

A plugin is a class with any of these hooks (plain `def` runs inline, `async def` may await):

    on_request_headers(ctx, headers)          -> None | Respond
    on_request_body(ctx, body)                -> None | bytes | Respond   whole body (BUFFERED)
    on_request_chunk(ctx, chunk, end)         -> None | bytes | Respond   per chunk (STREAMED, BUFFERED_PARTIAL)
    on_request_stream(ctx, chunks)            async generator: bytes in, bytes out (FULL_DUPLEX_STREAMED)
    on_request_trailers(ctx, trailers)        -> None
    ... and the same six for the response.

A hook the class does not define is a phase Envoy is not asked to send (see `registry`). Request hooks
run in chain order, response hooks in reverse chain order, like middleware unwinding. Returning
`Respond(...)` stops the chain and sends that reply from Envoy; a body or chunk hook returning bytes
replaces it (`b""` clears it, or holds a chunk's data back for later), returning None leaves it.
"""

from __future__ import annotations

import datetime
import enum
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, overload

from google.protobuf import json_format, struct_pb2

from sidecar.headers import Headers
from sidecar.wire import METADATA_NAMESPACE

__all__ = ["BodyMode", "Context", "Plugin", "Respond", "State", "StateKey"]

T = TypeVar("T")

#: Dynamic metadata namespace plugins write to unless they name another. The generated Envoy
#: config lists it in `metadata_options.receiving_namespaces`, so Envoy accepts it.


class BodyMode(enum.IntEnum):
    """How a body hook wants the body; the values are Envoy's `ProcessingMode.BodySendMode`."""

    NONE = 0
    STREAMED = 1
    BUFFERED = 2
    BUFFERED_PARTIAL = 3
    FULL_DUPLEX_STREAMED = 4


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the HTTP request from Envoy without (further) upstream processing."""

    status: int
    body: bytes | str = b""
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = ()
    #: Goes into Envoy's %RESPONSE_CODE_DETAILS%; keep it free of secrets.
    details: str = ""
    grpc_status: int | None = None

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"Respond status must be an HTTP status between 200 and 599, got {self.status}")


class StateKey(Generic[T]):
    """A typed key into `Context.state`: `STARTED = StateKey[float]("started")`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StateKey({self.name!r})"


class State:
    """Per-request storage shared by the plugins of a chain, keyed by `StateKey`s."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[StateKey[Any], Any] = {}

    def __getitem__(self, key: StateKey[T]) -> T:
        value: T = self._values[key]
        return value

    def __setitem__(self, key: StateKey[T], value: T) -> None:
        self._values[key] = value

    def __contains__(self, key: StateKey[Any]) -> bool:
        return key in self._values

    @overload
    def get(self, key: StateKey[T]) -> T | None: ...
    @overload
    def get(self, key: StateKey[T], default: T) -> T: ...
    def get(self, key: StateKey[T], default: T | None = None) -> T | None:
        return self._values.get(key, default)


class Context:
    """What a hook knows about the HTTP stream it is handling. One per ext_proc stream."""

    __slots__ = (
        "_attributes",
        "_attributes_pb",
        "_metadata",
        "_metadata_pb",
        "_send",
        "chain",
        "clear_route_cache_requested",
        "dynamic_metadata",
        "request_headers",
        "request_id",
        "response_headers",
        "state",
    )

    def __init__(self, chain: str, request_id: str = "", send: Callable[[Any], Awaitable[None]] | None = None) -> None:
        self.chain = chain
        self._send = send
        self.request_id = request_id
        self.state = State()
        #: The request headers as they left the chain; set once request headers were processed.
        self.request_headers: Headers | None = None
        #: The response headers, once Envoy sent them (only if some plugin has on_response_headers).
        self.response_headers: Headers | None = None
        self.dynamic_metadata: dict[str, dict[str, Any]] = {}
        self.clear_route_cache_requested = False
        self._attributes_pb: Mapping[str, struct_pb2.Struct] | None = None
        self._attributes: dict[str, Any] | None = None
        self._metadata_pb: Any = None
        self._metadata: dict[str, Any] | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        """The attributes Envoy sent (`request_attributes`/`response_attributes`), as plain Python."""
        if self._attributes is None:
            pb = self._attributes_pb or {}
            self._attributes = {key: json_format.MessageToDict(value) for key, value in pb.items()}
        return self._attributes

    @property
    def metadata(self) -> dict[str, Any]:
        """Dynamic metadata Envoy forwarded (`metadata_options.forwarding_namespaces`), by namespace."""
        if self._metadata is None:
            pb = self._metadata_pb
            self._metadata = (
                {ns: json_format.MessageToDict(value) for ns, value in pb.filter_metadata.items()} if pb else {}
            )
        return self._metadata

    def set_metadata(self, key: str, value: Any, namespace: str = METADATA_NAMESPACE) -> None:
        """Emit dynamic metadata (for access logs, later filters, routing). JSON-like values only."""
        _check_json(value, key)
        self.dynamic_metadata.setdefault(namespace, {})[key] = value

    def clear_route_cache(self) -> None:
        """Ask Envoy to re-pick the route after this request-headers phase (e.g. a header changed)."""
        self.clear_route_cache_requested = True

    async def extend_timeout(self, seconds: float) -> None:
        """Ask Envoy to wait up to `seconds` for the answer to the message being handled (a slow hook).

        Envoy accepts this once per message and caps it at the filter's `max_message_timeout` (the
        generated config allows 10 s, or the message timeout if that is longer).
        """
        if self._send is None:
            raise RuntimeError("extend_timeout() needs a running stream")
        from envoy.service.ext_proc.v3 import external_processor_pb2

        response = external_processor_pb2.ProcessingResponse()
        response.override_message_timeout.FromTimedelta(datetime.timedelta(seconds=seconds))
        await self._send(response)

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_json(item, where)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_json(item, where)
        return
    raise TypeError(f"metadata {where!r}: {type(value).__name__} is not JSON-like (str, number, bool, list, dict)")


class Plugin:
    """Base class for plugins. Subclasses define hooks (see module doc) and may set:

    * `name`: how logs, metrics and `sidecar plugins` call it (defaults to the class name);
    * `request_body` / `response_body`: the BodyMode the body hooks need (default BUFFERED).

    The constructor receives the plugin's `config` mapping from the sidecar config file.
    """

    name: ClassVar[str] = ""
    request_body: ClassVar[BodyMode | None] = None
    response_body: ClassVar[BodyMode | None] = None
    observe_only: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config: Mapping[str, Any] = config or {}

    @classmethod
    def display_name(cls) -> str:
        return cls.name or cls.__name__
