"""HTTP headers as plugins see them: a case-insensitive, multi-value mapping over Envoy's raw bytes.

Envoy sends header values in `raw_value` (bytes, not necessarily UTF-8). `headers[name]` decodes them
as latin-1 (lossless for any byte); `headers.raw(name)` returns the bytes. Every change is recorded
per name so the server can send Envoy the smallest `HeaderMutation` that yields the final state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, MutableMapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from google.protobuf import wrappers_pb2

__all__ = ["Headers", "append_option", "check_connection_field", "check_field"]

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_HeaderValue = base_pb2.HeaderValue
# Envoy's ext_proc reads `append_action` only when it is not 0, and APPEND_IF_EXISTS_OR_ADD *is* 0: an
# append is then decided by the deprecated `append` flag, which defaults to false (overwrite). So an
# appended value must carry `append: true`, or only the last value of a name reaches the peer.
_APPEND_FLAG = wrappers_pb2.BoolValue(value=True)


def append_option(name: str, value: bytes) -> base_pb2.HeaderValueOption:
    """A HeaderValueOption that Envoy's ext_proc applies as "add this value, keep the others"."""
    return base_pb2.HeaderValueOption(header=_HeaderValue(key=name, raw_value=value), append=_APPEND_FLAG)


# RFC 9110 5.6.2: a field name is a token.
_FIELD_NAME_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: Connection-specific fields (RFC 9110 7.6.1; HTTP/2 forbids them). Envoy's codecs own them: they drop a
#: `connection` a hook sets, and a `transfer-encoding` a hook sets or removes breaks the body's framing
#: (a chunked upload reached the upstream empty). A plugin cannot set them.
CONNECTION_FIELDS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
#: Names a plugin's set is checked further for: the connection's, and content-length.
_GUARDED_NAMES = CONNECTION_FIELDS | {"content-length"}


def _encode(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode("latin-1")


def check_field(name: str, value: str | bytes) -> tuple[str, bytes]:
    """A change a plugin makes, checked where it makes it. Envoy refuses a whole mutation that holds a name
    other than a token or a value with CR, LF or NUL, and answers the request with a 500 that names no
    plugin; a ValueError here is that plugin's error instead, under its chain's failure policy."""
    lowered = _checked_name(name)
    return lowered, _checked_value(lowered, value)


#: Names that passed `_checked_name`, as a plugin spelled them, to their lower-case form: plugins set the same few
#: names on every request, and a lookup is a tenth of the check. Bounded in count and in each name's length, so at
#: most about 1 MiB: a name past either is checked each time, never kept (a plugin echoing names from requests
#: costs a check each, not memory held for good).
_CHECKED_NAMES: dict[str, str] = {}
MAX_CHECKED_NAMES = 4096
MAX_CHECKED_NAME_LENGTH = 64


def _checked_name(name: str) -> str:
    lowered = _CHECKED_NAMES.get(name) if type(name) is str else None
    if lowered is not None:
        return lowered
    if not isinstance(name, str):
        raise TypeError(f"header name: expected str, got {type(name).__name__}")
    lowered = name.lower()
    bare = lowered[1:] if lowered.startswith(":") else lowered  # pseudo-headers: Envoy decides which may change
    # ASCII before lower-casing: the Kelvin sign lower-cases to "k", and the peer would get a name not asked for.
    if not bare or not name.isascii() or not _FIELD_NAME_CHARS.issuperset(bare):
        raise ValueError(f"header name {name!r}: expected an RFC 9110 token (letters, digits, !#$%&'*+-.^_`|~)")
    if (
        len(name) <= MAX_CHECKED_NAME_LENGTH
        and len(_CHECKED_NAMES) < MAX_CHECKED_NAMES
        and type(name) is str  # not a str subclass: its own __eq__
    ):
        _CHECKED_NAMES[name] = lowered
    return lowered


# What Envoy's header validation rejects in a value (CR, LF, NUL), and whitespace at either end (RFC 9110 5.5: Envoy
# strips it in front of a value set by ext_proc, HTTP/1 peers strip it at the end: what a plugin set would not be
# what the peer gets). One scan finds either (three `in` tests cost five times as much); `_refuse_value` says which.
_SUSPECT_VALUE = re.compile(rb"[\r\n\0]|\A[ \t]|[ \t]\Z")


def _checked_value(lowered: str, value: str | bytes) -> bytes:
    if isinstance(value, str):
        try:
            raw = str.encode(value, "latin-1")  # a str subclass's own encode() could return anything
        except UnicodeEncodeError:
            raise ValueError(
                f"header {lowered!r}: the value has characters outside latin-1; encode it (e.g. UTF-8) to bytes"
            ) from None
    elif isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        raise TypeError(f"header {lowered!r}: expected a str or bytes value, got {type(value).__name__}")
    if not raw.isalnum() and _SUSPECT_VALUE.search(raw) is not None:  # letters and digits only: nothing to find
        _refuse_value(lowered, raw)
    return raw


def _refuse_value(lowered: str, raw: bytes) -> None:
    if b"\r" in raw or b"\n" in raw or b"\0" in raw:
        raise ValueError(f"header {lowered!r}: the value contains CR, LF or NUL")
    raise ValueError(
        f"header {lowered!r}: the value starts or ends with a space or tab (Envoy strips it; RFC 9110 5.5)"
    )


def check_connection_field(name: str) -> None:
    """Refuse a field that Envoy's codecs own (`CONNECTION_FIELDS`): setting it would not reach the peer as
    set, or would break the body's framing. `name` is lower-case."""
    if name in CONNECTION_FIELDS:
        raise ValueError(
            f"header {name!r} belongs to the connection, which Envoy manages (RFC 9110 7.6.1): a plugin cannot set it"
        )


#: What `Headers.snapshot` returns and `restore` takes: items, replaced names, appended values.
Snapshot = tuple[list[tuple[str, bytes]], dict[str, bytes | None], dict[str, list[bytes]]]


class Headers(MutableMapping[str, str]):
    """Request or response headers (or trailers) of one HTTP stream.

    Names are case-insensitive. `headers[name]` is the first value; `get_all(name)` all of them.
    `headers[name] = value` replaces every value, `append` adds one, `del headers[name]` removes all.
    Pseudo-headers (`:path`, `:method`, ...) are present as Envoy sends them; Envoy's mutation rules
    decide which of them may change.
    """

    __slots__ = ("_appended", "_items", "_replaced")

    def __init__(self, items: Iterable[tuple[str, str | bytes]] = ()) -> None:
        self._items: list[tuple[str, bytes]] = [(name.lower(), _encode(value)) for name, value in items]
        #: Names whose values were replaced or removed since the last flush, each with its one value when the
        #: last change to it was a set (the mutation needs no scan of `_items` for it), else None.
        self._replaced: dict[str, bytes | None] = {}
        #: Values added to names not replaced.
        self._appended: dict[str, list[bytes]] = {}

    @classmethod
    def from_envoy(cls, header_map: base_pb2.HeaderMap) -> Headers:
        headers = cls.__new__(cls)
        # Envoy lower-cases keys; older Envoys filled `value` instead of `raw_value`.
        headers._items = [(h.key, h.raw_value or h.value.encode("latin-1")) for h in header_map.headers]
        headers._replaced = {}
        headers._appended = {}
        return headers

    # -- reading -------------------------------------------------------------------------------

    def raw(self, name: str, default: bytes | None = None) -> bytes | None:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def raw_all(self, name: str) -> list[bytes]:
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def get_all(self, name: str) -> list[str]:
        return [value.decode("latin-1") for value in self.raw_all(name)]

    def __getitem__(self, name: str) -> str:
        value = self.raw(name)
        if value is None:
            raise KeyError(name)
        return value.decode("latin-1")

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()
        for key, _ in self._items:  # noqa: SIM110 - a loop, not any() over a generator: a third of the time
            if key == name:
                return True
        return False

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for key, _ in self._items:
            if key not in seen:
                seen.add(key)
                yield key

    def __len__(self) -> int:
        return len({key for key, _ in self._items})

    def items_all(self) -> list[tuple[str, str]]:
        """Every (name, value) pair in order, repeated names included."""
        return [(key, value.decode("latin-1")) for key, value in self._items]

    def __repr__(self) -> str:
        return f"Headers({self.items_all()!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return sorted(self._items) == sorted(other._items)
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    # -- changing ------------------------------------------------------------------------------

    def __setitem__(self, name: str, value: str | bytes) -> None:
        # Every plugin sets headers on every request: the remembered name is looked up here, not in a call.
        lowered = _CHECKED_NAMES.get(name) if type(name) is str else None
        name = lowered if lowered is not None else _checked_name(name)
        encoded = _checked_value(name, value)
        if name in _GUARDED_NAMES:
            self._set_guarded(name, encoded)
        else:
            self._put(name, encoded)

    def _set_guarded(self, name: str, encoded: bytes) -> None:
        check_connection_field(name)
        if name == "content-length" and self.raw_all(name) != [encoded]:
            raise ValueError(
                "header 'content-length': the sidecar keeps it equal to the body (Envoy cuts or rejects a body "
                "that disagrees with it); return a new body from a body hook, or remove the header"
            )
        self._put(name, encoded)

    def append(self, name: str, value: str | bytes) -> None:
        name, encoded = check_field(name, value)
        check_connection_field(name)
        if name == "content-length":
            raise ValueError("header 'content-length': a message has one length; the sidecar keeps it right")
        self._add(name, encoded)

    # What the sidecar and Envoy do, past the rules for plugins: the sidecar keeps content-length equal to a
    # body it replaced, and the test Driver applies Envoy's side of a mutation.

    def _put(self, name: str, value: bytes) -> None:
        """Replace every value of a (lower-case) name, unchecked: for the sidecar's own changes."""
        items = self._items
        for key, _ in items:  # most names a plugin sets are new: no copy of the list for them
            if key == name:
                items = self._items = [(key, v) for key, v in items if key != name]
                break
        items.append((name, value))
        self._replaced[name] = value
        if self._appended:
            self._appended.pop(name, None)

    def _add(self, name: str, value: bytes) -> None:
        """Add a value to a (lower-case) name, unchecked: for the sidecar's own changes."""
        self._items.append((name, value))
        if name in self._replaced:
            self._replaced[name] = None  # more than one value now
        else:
            self._appended.setdefault(name, []).append(value)

    def __delitem__(self, name: str) -> None:
        name = name.lower()
        if name not in self:
            raise KeyError(name)
        self.remove(name)

    def remove(self, name: str) -> None:
        """Remove every value of `name`; no error if there is none. Removing `content-length` is fine (Envoy
        then frames the body itself: chunked on HTTP/1); `transfer-encoding` is the connection's."""
        name = name.lower()
        if name == "transfer-encoding":
            check_connection_field(name)
        self._discard(name)

    def _discard(self, name: str) -> None:
        """Remove every value of a (lower-case) name, unchecked: for the sidecar's own changes."""
        self._items = [(key, v) for key, v in self._items if key != name]
        self._replaced[name] = None
        self._appended.pop(name, None)

    @property
    def changed(self) -> bool:
        return bool(self._replaced or self._appended)

    def snapshot(self) -> Snapshot:
        """The state to `restore` if what comes next must be undone (a fail_open plugin that fails)."""
        return list(self._items), dict(self._replaced), {name: list(v) for name, v in self._appended.items()}

    def restore(self, state: Snapshot) -> None:
        items, replaced, appended = state
        # Copies all the way down: the state may be restored again, and later appends must not change it.
        self._items, self._replaced = list(items), dict(replaced)
        self._appended = {name: list(values) for name, values in appended.items()}

    # -- to Envoy ------------------------------------------------------------------------------

    def mutation(self) -> ext_proc_pb2.HeaderMutation | None:
        """The HeaderMutation that turns what Envoy sent into the current state, or None if unchanged."""
        if not self.changed:
            return None
        mutation = ext_proc_pb2.HeaderMutation()
        self._write(mutation)
        return mutation

    def flush_into(self, target: ext_proc_pb2.HeaderMutation) -> None:
        """Write the changes into `target` (a field of the response: no copy), then track afresh, so a
        later phase sends only later changes."""
        self._write(target)
        self._replaced = {}
        self._appended = {}

    def _write(self, mutation: ext_proc_pb2.HeaderMutation) -> None:
        add = mutation.set_headers.add
        for name, value in sorted(self._replaced.items()):
            values = [value] if value is not None else self.raw_all(name)
            if not values:
                mutation.remove_headers.append(name)
                continue
            first, *rest = values
            add(header=_HeaderValue(key=name, raw_value=first), append_action=_OVERWRITE)
            for value in rest:
                add(header=_HeaderValue(key=name, raw_value=value), append=_APPEND_FLAG)
        for name, values in self._appended.items():
            for value in values:
                add(header=_HeaderValue(key=name, raw_value=value), append=_APPEND_FLAG)

    def to_header_map(self) -> base_pb2.HeaderMap:
        return base_pb2.HeaderMap(headers=[_HeaderValue(key=k, raw_value=v) for k, v in self._items])
