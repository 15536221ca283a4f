"""Fuzzing the stream processor: whatever Envoy (or anything on its socket) sends, a stream ends in an
answer, a ProtocolError or a StreamFailure (which the server maps to a gRPC status), and never hangs.

Hypothesis makes ProcessingRequest sequences in any order with any fields: every oneof kind and none,
repeated kinds, trailers before headers, observability mode, metadata and attributes, empty and 1 MiB
header values and bodies, bytes that are no protobuf, and invalid UTF-8 in string fields (header keys
and values), which only the wire can carry. Each goes through `lifetime.serve` with in-memory read and
write, for chains with headers-only, BUFFERED, STREAMED, BUFFERED_PARTIAL and FULL_DUPLEX_STREAMED
plugins, broken plugins, fail_open, and a chain that gets a mode_override.

CI runs a small, fixed (derandomized) set. For a deeper, random run:

    SIDECAR_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/extproc/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar import BodyMode, Context, Headers, Plugin
from sidecar.chains import Chain, Registry
from sidecar.errors import ProtocolError, StreamFailure
from sidecar.extproc.lifetime import serve
from sidecar.extproc.metrics import Metrics
from sidecar.extproc.processor import StreamProcessor
from sidecar.wire import PHASES
from sidecar_plugins.jsonl import JsonlTag
from sidecar_plugins.redact import JsonRedact
from sidecar_plugins.stream_redact import StreamRedact
from tests.support import testplugins as tp

EXAMPLES = int(os.environ.get("SIDECAR_FUZZ_EXAMPLES", "150"))
#: One stream, however hostile, ends within this (the FULL_DUPLEX deadlines below are shorter).
STREAM_BOUND = 10.0
STREAM_TIMEOUT = 0.5

KINDS = PHASES  # request_headers ... response_trailers, in Envoy's order
HUGE = 1 << 20

# Serialized, these markers become invalid UTF-8 of the same length (so the framing stays right).
KEY_MARKER, BAD_KEY = b"@@KEY@@", b"\xff\xfe\xc3\x28\x80\xff\xfe"
VALUE_MARKER, BAD_VALUE = b"@@VAL@@", b"\xc0\xaf\xed\xa0\x80\xf8\x88"


class Trailing(Plugin):
    """Headers and trailers both ways, so trailers are asked for."""

    def on_request_trailers(self, ctx: Context, trailers: Headers) -> None:
        trailers["x-seen"] = "1"

    def on_response_trailers(self, ctx: Context, trailers: Headers) -> None:
        trailers.remove("x-secret")


class DuplexChunks(Plugin):
    """Chunk hooks in FULL_DUPLEX_STREAMED (answered inline, no pipeline task)."""

    request_body = BodyMode.FULL_DUPLEX_STREAMED
    response_body = BodyMode.FULL_DUPLEX_STREAMED

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        return chunk[::-1]

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes | None:
        return None if chunk else b""


class Holder(Plugin):
    """FULL_DUPLEX: holds everything until the end, then one chunk (0 outputs per input, then 1)."""

    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        yield b"".join([chunk async for chunk in chunks])


def _registry(*plugins: Plugin, on_error: str = "fail_closed") -> Registry:
    return Registry([Chain("default", list(plugins), on_error)])


CHAINS: dict[str, Callable[[], tuple[Registry, str | None]]] = {
    "headers": lambda: (_registry(tp.AddHeaders(), tp.DenyHeader(), tp.Metadata()), None),
    "buffered": lambda: (_registry(tp.UpperBody(), JsonRedact(), tp.AddHeaders()), None),
    "buffered-fail-open": lambda: (_registry(tp.Raiser(), tp.UpperBody(), on_error="fail_open"), None),
    "streamed": lambda: (_registry(tp.ChunkGate({"limit": 64}), StreamRedact({"pattern": "secret"})), None),
    "partial": lambda: (_registry(tp.PartialProbe()), None),
    "trailers": lambda: (_registry(Trailing(), tp.AddHeaders()), None),
    "broken": lambda: (_registry(tp.WrongResult(), tp.WrongBody()), None),
    "full-duplex": lambda: (_registry(tp.FdUpper(), JsonlTag(), StreamRedact({"pattern": "ab"})), None),
    "full-duplex-chunks": lambda: (_registry(DuplexChunks()), None),
    "full-duplex-holder": lambda: (_registry(Holder(), tp.WrongYield()), None),
    "mode-override": lambda: (
        Registry([Chain("default", [tp.UpperBody()]), Chain("light", [tp.RequestOnly()])]),
        "light",
    ),
}

# -- what Envoy (or anyone on the socket) might send -----------------------------------------------------

_NAMES = [":path", ":method", ":status", "content-type", "content-length", "x-request-id", "x-deny", "x-boom"]
_NAMES += ["x-return", "x-delay", "x-remove-me", "x-secret", "transfer-encoding"]
_names = st.one_of(st.sampled_from(_NAMES), st.text(max_size=12), st.just(KEY_MARKER.decode()))
_values = st.one_of(
    st.sampled_from([b"", b"1", b"application/json", b"-1", b"99999999999999999999", b"int", b"class", b"crlf"]),
    st.binary(max_size=24),
    st.just(b"v" * HUGE),
)
_header = st.builds(
    lambda name, value, as_text: (
        base_pb2.HeaderValue(key=name, value=VALUE_MARKER.decode())  # `value` is a string field
        if as_text
        else base_pb2.HeaderValue(key=name, raw_value=value)
    ),
    _names,
    _values,
    st.booleans(),
)
_header_map = st.builds(lambda items: base_pb2.HeaderMap(headers=items), st.lists(_header, max_size=6))
_body = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"boom", b"secret", b'{"password": "x"}\n', b"reject", b"int", b"bad-header-value"]),
    st.just(b"s" * (HUGE + 1)),
)


def _message(kind: str | None, draw: st.DrawFn) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest()
    if kind in ("request_headers", "response_headers"):
        getattr(request, kind).CopyFrom(pb.HttpHeaders(headers=draw(_header_map), end_of_stream=draw(st.booleans())))
    elif kind in ("request_body", "response_body"):
        getattr(request, kind).CopyFrom(pb.HttpBody(body=draw(_body), end_of_stream=draw(st.booleans())))
    elif kind in ("request_trailers", "response_trailers"):
        getattr(request, kind).CopyFrom(pb.HttpTrailers(trailers=draw(_header_map)))
    if draw(st.integers(0, 9)) == 0:
        request.observability_mode = True
    if draw(st.integers(0, 9)) == 0:
        request.metadata_context.filter_metadata["ns"].CopyFrom(struct_pb2.Struct(fields={"k": struct_pb2.Value()}))
    if draw(st.integers(0, 9)) == 0:
        request.attributes["envoy.filters.http.ext_proc"].CopyFrom(struct_pb2.Struct())
    return request


@st.composite
def _wire(draw: st.DrawFn) -> bytes:
    """One message as bytes on the wire: mostly well formed, sometimes corrupted."""
    kind = draw(st.sampled_from((*KINDS, None)))
    data: bytes = _message(kind, draw).SerializeToString()
    data = data.replace(KEY_MARKER, BAD_KEY) if draw(st.booleans()) else data
    data = data.replace(VALUE_MARKER, BAD_VALUE) if draw(st.booleans()) else data
    damage = draw(st.integers(0, 19))
    if damage == 0:
        return draw(st.binary(max_size=32))  # no protobuf at all (or by chance one)
    if damage == 1 and data:
        return data[: draw(st.integers(0, len(data) - 1))]  # cut short
    return data


@st.composite
def _envoy_shaped(draw: st.DrawFn, sends: frozenset[str]) -> list[bytes]:
    """The phases Envoy sends for this chain (`sends`), in its order (bodies repeat, trailers and response
    may be left out), then a few random edits: a message inserted, dropped, repeated or two swapped.
    Reaches the later phases that random order rarely does."""
    messages = []
    for kind in KINDS:
        if kind not in sends:
            continue
        if kind == "request_headers":
            repeats = 1
        elif kind.endswith("_body"):
            repeats = draw(st.integers(0, 3))
        else:
            repeats = draw(st.sampled_from([0, 1, 1]))
        messages += [_message(kind, draw).SerializeToString() for _ in range(repeats)]
    for _ in range(draw(st.integers(0, 2))):
        edit = draw(st.sampled_from(["insert", "drop", "repeat", "swap"]))
        at = draw(st.integers(0, max(len(messages) - 1, 0)))
        if edit == "insert" or not messages:
            messages.insert(at, draw(_wire()))
        elif edit == "drop":
            del messages[at]
        elif edit == "repeat":
            messages.insert(at, messages[at])
        else:
            other = draw(st.integers(0, len(messages) - 1))
            messages[at], messages[other] = messages[other], messages[at]
    return messages


def _stream(sends: frozenset[str]) -> st.SearchStrategy[list[bytes]]:
    """Any sequence: mostly Envoy-shaped with edits, sometimes messages in any order."""
    return st.one_of(_envoy_shaped(sends), _envoy_shaped(sends), st.lists(_wire(), max_size=8))


def _sends(registry: Registry, chain: Chain) -> frozenset[str]:
    """The phases Envoy sends for streams of `chain`."""
    mode = registry.effective_mode(chain)
    send = mode.SEND
    return frozenset(
        kind
        for kind, sent in [
            ("request_headers", True),
            ("request_body", mode.request_body_mode != BodyMode.NONE),
            ("request_trailers", mode.request_trailer_mode == send),
            ("response_headers", mode.response_header_mode == send),
            ("response_body", mode.response_body_mode != BodyMode.NONE),
            ("response_trailers", mode.response_trailer_mode == send),
        ]
        if sent
    )


# -- the property ----------------------------------------------------------------------------------------

_ANSWERS = {*KINDS, "immediate_response"}


async def _serve(registry: Registry, chain_name: str | None, wire: list[bytes]) -> None:
    chain = registry.chain(chain_name)
    assert chain is not None
    processor = StreamProcessor(chain, registry, metrics=Metrics(), stream_timeout=STREAM_TIMEOUT)
    incoming = iter(wire)
    last: list[str | None] = [None]
    answers = [0]

    async def read() -> pb.ProcessingRequest | None:
        data = next(incoming, None)
        if data is None:
            return None  # Envoy half-closes
        try:
            request = pb.ProcessingRequest.FromString(data)
        except DecodeError:
            raise ProtocolError("malformed ProcessingRequest") from None  # as the server's read does
        last[0] = request.WhichOneof("request")
        return request

    async def write(response: pb.ProcessingResponse) -> None:
        which = response.WhichOneof("response")
        if response.HasField("override_message_timeout"):
            return
        answers[0] += 1
        assert which in _ANSWERS, response
        if not processor.full_duplex:
            # Outside FULL_DUPLEX every answer is to the message just read, or an immediate response.
            assert which in (last[0], "immediate_response"), (which, last[0])

    async def write_encoded(message: bytes, *more: bytes) -> None:
        # As the native transport writes them: answers carrying a hook's bytes come encoded by hand.
        await write(pb.ProcessingResponse.FromString(b"".join((message, *more))))

    ended = "half-closed"
    try:
        async with asyncio.timeout(STREAM_BOUND):  # a hung stream fails the test as TimeoutError
            await serve(processor, read, write, write_encoded)
    except (ProtocolError, StreamFailure) as exc:
        ended = type(exc).__name__  # the server ends the call with a gRPC status: Envoy fails closed
    assert processor.metrics.active == 0  # the stream is accounted as closed, however it ended
    # `pytest --hypothesis-show-statistics` shows how deep the examples went.
    event(f"ended: {ended}")
    event(f"answers: {min(answers[0], 4)}+" if answers[0] >= 4 else f"answers: {answers[0]}")
    if processor.metrics.plugin_errors:
        event("a plugin error took the failure policy")


@pytest.mark.parametrize("chain", sorted(CHAINS))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize="SIDECAR_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_message_sequence_ends_in_an_answer_or_a_stream_error_never_a_crash_or_a_hang(
    chain: str, data: st.DataObject
) -> None:
    registry, name = CHAINS[chain]()
    picked = registry.chain(name)
    assert picked is not None
    wire = data.draw(_stream(_sends(registry, picked)), label="wire")
    asyncio.run(_serve(registry, name, wire))


def test_the_fuzzer_reaches_the_errors_it_is_about() -> None:
    """The strategies are not vacuous: known-bad sequences raise what the property allows."""

    async def outcome(wire: list[bytes]) -> str:
        registry, _ = CHAINS["buffered"]()
        try:
            await _serve_raising(registry, wire)
        except ProtocolError as exc:
            return f"protocol: {exc}"
        return "ok"

    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders()).SerializeToString()
    bad_key = (
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="@@KEY@@")]))
        )
        .SerializeToString()
        .replace(KEY_MARKER, BAD_KEY)
    )
    trailers_first = pb.ProcessingRequest(request_trailers=pb.HttpTrailers()).SerializeToString()
    assert asyncio.run(outcome([bad_key])) == "protocol: malformed ProcessingRequest"
    assert asyncio.run(outcome([trailers_first])).startswith("protocol: request_trailers arrived before")
    assert asyncio.run(outcome([headers, headers])).startswith("protocol: request_headers arrived out of order")
    assert asyncio.run(outcome([headers])) == "ok"


async def _serve_raising(registry: Registry, wire: list[bytes]) -> None:
    chain = registry.chain(None)
    assert chain is not None
    incoming = iter(wire)

    async def read() -> pb.ProcessingRequest | None:
        data = next(incoming, None)
        if data is None:
            return None
        try:
            return pb.ProcessingRequest.FromString(data)
        except DecodeError:
            raise ProtocolError("malformed ProcessingRequest") from None

    async def write(response: pb.ProcessingResponse) -> None:
        return None

    await serve(StreamProcessor(chain, registry), read, write)
