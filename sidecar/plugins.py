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

Anything else a hook returns or yields is that plugin's error, like an exception: the chain's failure
policy applies, never a silent pass. `sidecar.chains.check_plugin` checks the hooks' names and shapes at
start-up (docs/plugins.md, "What a broken plugin gets").
"""

from __future__ import annotations

import datetime
import enum
import inspect
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, overload

from google.protobuf import json_format, struct_pb2

from sidecar.headers import Headers, check_connection_field, check_field
from sidecar.wire import METADATA_NAMESPACE

__all__ = ["BodyMode", "Context", "HeaderValue", "Plugin", "Respond", "State", "StateKey"]

T = TypeVar("T")


class BodyMode(enum.IntEnum):
    """How a body hook wants the body; the values are Envoy's `ProcessingMode.BodySendMode`."""

    NONE = 0
    STREAMED = 1
    BUFFERED = 2
    BUFFERED_PARTIAL = 3
    FULL_DUPLEX_STREAMED = 4


#: A header value a Respond accepts: text (latin-1, as Envoy's raw header bytes), bytes, or a whole number.
HeaderValue = str | bytes | int


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the HTTP request from Envoy without (further) upstream processing.

    Checked when built, so a mistake fails in the hook that made it (and the chain's failure policy
    names that plugin): `status` an int from 200 to 599 (Envoy turns a local reply under 200 into 200,
    and RFC 9110 has no status over 599); header names RFC 9110 tokens (lower-cased; no pseudo-headers:
    the status is `status`); values str (latin-1), bytes or int, without CR, LF or NUL; `body` bytes or
    str (sent as UTF-8); `grpc_status` a gRPC code 0-16. After the check `headers` is a tuple of
    (lower-case name, value) pairs.
    """

    status: int
    body: bytes | str = b""
    headers: Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]] = ()
    #: Goes into Envoy's %RESPONSE_CODE_DETAILS%; keep it free of secrets.
    details: str = ""
    grpc_status: int | None = None

    def __post_init__(self) -> None:
        status = self.status
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(f"Respond status: expected an int from 200 to 599, got {describe(status)}")
        if not 200 <= status <= 599:
            raise ValueError(f"Respond status: expected an HTTP status from 200 to 599, got {status}")
        object.__setattr__(self, "status", int(status))  # an IntEnum such as HTTPStatus becomes its number
        body = self.body
        if isinstance(body, bytearray | memoryview):
            object.__setattr__(self, "body", bytes(body))
        elif not isinstance(body, bytes | str):
            raise TypeError(f"Respond body: expected bytes or str, got {describe(body)}")
        object.__setattr__(self, "headers", _header_pairs(self.headers))
        _check_framing(status, self.body, self.header_pairs)
        if not isinstance(self.details, str):
            raise TypeError(f"Respond details: expected str, got {describe(self.details)}")
        code = self.grpc_status
        if code is not None and (isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 16):
            raise ValueError(
                f"Respond grpc_status: expected None or a gRPC status code from 0 to 16, got {describe(code)}"
            )

    @property
    def header_pairs(self) -> tuple[tuple[str, str], ...]:
        """The checked headers: (lower-case name, value) pairs, values as latin-1 text."""
        pairs: tuple[tuple[str, str], ...] = self.headers  # type: ignore[assignment]  # set by __post_init__
        return pairs


#: Statuses whose reply has no body (RFC 9110 6.4.1): Envoy would send a content-length with no body on
#: HTTP/1 and reset the stream on HTTP/2.
NO_BODY_STATUSES = frozenset({204, 304})


def _check_framing(status: int, body: bytes | str, headers: tuple[tuple[str, str], ...]) -> None:
    """The reply's framing is Envoy's: no body where the status has none, and a content-length (if the
    plugin gives one) equal to the body's."""
    length = len(body.encode() if isinstance(body, str) else body)
    if length and status in NO_BODY_STATUSES:
        raise ValueError(f"Respond status {status} has no body (RFC 9110), got a body of {length} bytes")
    for name, value in headers:
        if name == "content-length" and value != str(length):
            raise ValueError(
                f"Respond header 'content-length': got {value!r} for a body of {length} bytes "
                "(leave it out: Envoy sets it)"
            )


def _header_pairs(headers: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(headers, Headers):
        items: Any = headers.items_all()
    elif isinstance(headers, Mapping):
        items = headers.items()
    elif isinstance(headers, str | bytes) or not isinstance(headers, Iterable):
        raise TypeError(f"Respond headers: expected a mapping or (name, value) pairs, got {describe(headers)}")
    else:
        items = headers
    pairs = []
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(f"Respond headers: expected (name, value) pairs, got an item {describe(item)}")
        name, value = item
        pairs.append(_header(name, value))
    return tuple(pairs)


def _header(name: Any, value: Any) -> tuple[str, str]:
    """One Respond header, checked as a hook's header changes are (`check_field`), plus what only a local
    reply adds: no pseudo-headers (the status is `status`), and whole numbers as text."""
    if not isinstance(name, str):
        raise TypeError(f"Respond header name: expected str, got {describe(name)}")
    if name.startswith(":"):
        raise ValueError(f"Respond header {name!r}: pseudo-headers cannot be set; the status is Respond(status=...)")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(int(value))
    elif isinstance(value, bytearray):
        value = bytes(value)
    elif not isinstance(value, str | bytes):
        raise TypeError(f"Respond header {name!r}: expected a str, bytes or int value, got {describe(value)}")
    try:
        checked, raw = check_field(name, value)
        check_connection_field(checked)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"Respond {exc}") from None
    return checked, raw.decode("latin-1")


def describe(value: Any) -> str:
    """What a plugin handed over, for an error message: the type, and the value only when it cannot hold a
    secret (numbers, booleans, None); sizes for text and bytes. Closes a coroutine or generator so it is
    not left "never awaited"."""
    if value is None or isinstance(value, bool | int | float):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, type):
        return f"the class {value.__qualname__} (not an instance of it)"
    if inspect.iscoroutine(value):
        value.close()
        return "a coroutine, never run (a plain def hook cannot await: declare it async def, or await it)"
    if inspect.isgenerator(value):
        value.close()
        return "a generator, never run (only on_*_stream hooks yield, and they are async generators)"
    if inspect.isasyncgen(value) or inspect.isawaitable(value):
        return f"an awaitable {type(value).__name__} (await it inside an async def hook)"
    if isinstance(value, str):
        return f"str of {len(value)} characters"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{type(value).__name__} of {len(value)} bytes"
    if isinstance(value, tuple | list | dict | set | frozenset):
        return f"{type(value).__name__} of {len(value)} items"
    return f"a {type(value).__qualname__}"


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
        "_namespaces",
        "_send",
        "chain",
        "clear_route_cache_requested",
        "dynamic_metadata",
        "request_headers",
        "request_id",
        "response_headers",
        "state",
    )

    def __init__(
        self,
        chain: str,
        request_id: str = "",
        send: Callable[[Any], Awaitable[None]] | None = None,
        namespaces: Iterable[str] = (METADATA_NAMESPACE,),
    ) -> None:
        self.chain = chain
        self._send = send
        #: Where `set_metadata` may write: the namespaces the chain's plugins declared, which every generated
        #: config lists in Envoy's `receiving_namespaces` (Envoy drops any other without a word).
        self._namespaces = frozenset(namespaces)
        self.request_id = request_id
        self.state = State()
        #: The request headers as they left the chain; set once request headers were processed.
        self.request_headers: Headers | None = None
        #: The response headers, once Envoy sent them (only if some plugin has on_response_headers).
        self.response_headers: Headers | None = None
        self.dynamic_metadata: dict[str, dict[str, Any]] = {}
        self.clear_route_cache_requested = False
        self._attributes_pb: list[Mapping[str, struct_pb2.Struct]] = []
        self._attributes: dict[str, Any] | None = None
        self._metadata_pb: Any = None
        self._metadata: dict[str, Any] | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        """The attributes Envoy sent for the chain's declared `request_attributes`/`response_attributes`, by
        name: `ctx.attributes["request.path"]`. The request's stay when the response's arrive.

        Envoy nests them under the ext_proc filter's config name, which differs between generated configs
        (`envoy-config`, `render`, the chart), so they are merged here; whole numbers come back as int
        (`response.code` is 200), as in metadata."""
        if self._attributes is None:
            merged: dict[str, Any] = {}
            for sent in self._attributes_pb:
                for struct in sent.values():
                    merged.update(struct_to_python(struct))
            self._attributes = merged
        return self._attributes

    @property
    def metadata(self) -> dict[str, Any]:
        """Dynamic metadata Envoy forwarded (`metadata_options.forwarding_namespaces`), by namespace."""
        if self._metadata is None:
            pb = self._metadata_pb
            self._metadata = {ns: struct_to_python(value) for ns, value in pb.filter_metadata.items()} if pb else {}
        return self._metadata

    def set_metadata(self, key: str, value: Any, namespace: str = METADATA_NAMESPACE) -> None:
        """Emit dynamic metadata (for access logs, later filters, routing). JSON-like values only; numbers
        travel as doubles (protobuf Struct has one number type): whole ones come back as int.

        `namespace` must be the sidecar's own or one the plugin declares in `metadata_namespaces`: Envoy
        keeps only the namespaces its config accepts, and every generated config accepts exactly those.
        """
        if namespace not in self._namespaces:
            declared = ", ".join(sorted(self._namespaces))
            raise ValueError(
                f"set_metadata: namespace {namespace!r} is not declared (chain {self.chain!r} may write {declared});"
                " add it to the plugin's metadata_namespaces so the generated Envoy config accepts it"
            )
        if not isinstance(key, str):
            raise TypeError(f"set_metadata: the key must be a str, got {describe(key)}")
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
    * `request_body` / `response_body`: the BodyMode the body hooks need (default BUFFERED);
    * `metadata_namespaces`: dynamic metadata namespaces `ctx.set_metadata` writes besides the sidecar's;
    * `forwarding_namespaces`: dynamic metadata namespaces Envoy sends along (`ctx.metadata`);
    * `request_attributes` / `response_attributes`: Envoy attributes the plugin reads (`ctx.attributes`),
      e.g. ("request.path", "source.address"), sent with the request's or the response's first message.

    Every generated Envoy config (`envoy-config`, `render`) asks Envoy for what the plugins declare.

    The constructor receives the plugin's `config` mapping from the sidecar config file; a subclass that
    defines `__init__(self, config)` calls `super().__init__(config)`, which sets `self.config`.
    """

    name: ClassVar[str] = ""
    request_body: ClassVar[BodyMode | None] = None
    response_body: ClassVar[BodyMode | None] = None
    observe_only: ClassVar[bool] = False
    metadata_namespaces: ClassVar[tuple[str, ...]] = ()
    forwarding_namespaces: ClassVar[tuple[str, ...]] = ()
    request_attributes: ClassVar[tuple[str, ...]] = ()
    response_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config: Mapping[str, Any] = config or {}

    @classmethod
    def display_name(cls) -> str:
        return cls.name or cls.__name__


def struct_to_python(value: struct_pb2.Struct) -> dict[str, Any]:
    """A protobuf Struct as Envoy shows it: Struct has one number type (double), and Envoy prints a whole
    one as a whole number (`%DYNAMIC_METADATA%` of 3 is "3"), so whole numbers come back as int."""
    out: dict[str, Any] = _whole_numbers(json_format.MessageToDict(value))
    return out


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value
