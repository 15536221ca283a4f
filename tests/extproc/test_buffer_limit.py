"""Bodies Envoy cannot buffer: the sidecar answers them itself instead of leaving Envoy stuck (issue: 2 MiB uploads).

Envoy 1.40's side of these is in docs/streaming.md ("Bodies past Envoy's buffer"); `test_envoy_buffer_limit.py`
runs the same cases through a real Envoy.
"""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar import BodyMode, Context, Plugin, Respond
from sidecar.chains import Chain, Registry
from sidecar.extproc.processor import ENVOY_BUFFER_LIMIT, StreamProcessor
from sidecar.testing import Driver, Request
from tests.support import testplugins as tp

LIMIT = ENVOY_BUFFER_LIMIT


def _headers(kind: str, pairs: dict[str, str], end: bool = False) -> pb.ProcessingRequest:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.ProcessingRequest(**{kind: pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=end)})


def _body(kind: str, body: bytes, end: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(**{kind: pb.HttpBody(body=body, end_of_stream=end)})


def _run(processor: StreamProcessor, *messages: pb.ProcessingRequest) -> list[pb.ProcessingResponse | None]:
    async def run() -> list[pb.ProcessingResponse | None]:
        return [await processor.process(message) for message in messages]

    return asyncio.run(run())


# ---- BUFFERED: a body announced longer than the buffer is answered at its headers ----------------------


def _narrowed(**kwargs: int) -> StreamProcessor:
    """A BUFFERED chain in a filter that streams (another chain needs it): the case Envoy 1.40 stalls on."""
    registry = Registry([Chain("stream", [tp.StreamProbe()]), Chain("buffered", [tp.BufferedProbe()])])
    return StreamProcessor(registry.chains["buffered"], registry, **kwargs)


@pytest.mark.parametrize("length", [LIMIT + 1, 2 * LIMIT, 10**18])
def test_a_buffered_request_announced_past_the_buffer_is_413_at_its_headers(length: int) -> None:
    processor = _narrowed()
    [answer] = _run(processor, _headers("request_headers", {":method": "POST", "content-length": str(length)}))
    assert answer is not None and answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 413
    assert answer.immediate_response.details == "sidecar_body_over_buffer_limit"
    assert b"Payload Too Large" in answer.immediate_response.body


def test_the_413_comes_after_the_header_hooks_so_a_deny_still_wins() -> None:
    result = Driver([tp.DenyHeader(), tp.BufferedProbe()]).run(
        Request("POST", headers={"x-deny": "1", "content-length": str(LIMIT + 1)}, body=b"x" * (LIMIT + 1))
    )
    assert (result.status, result.upstream) == (403, None)


@pytest.mark.parametrize(
    "headers",
    [
        {"content-length": str(LIMIT)},  # exactly the limit fits
        {},  # no length announced (chunked, HTTP/2): Envoy's own limit applies
        {"content-length": "12abc"},  # not a number: Envoy refuses it before the filter
        {"content-length": "-5"},
        {"content-length": "9" * 40},
    ],
)
def test_a_buffered_request_not_announced_past_the_buffer_goes_on(headers: dict[str, str]) -> None:
    body = b"y" * 1000
    result = Driver([tp.UpperBody()]).run(Request("POST", headers=headers, body=body))
    assert result.upstream is not None and result.upstream.body == body.upper() * 2


def test_streamed_and_partial_chains_are_not_refused_at_their_headers() -> None:
    for plugin in (tp.StreamProbe(), tp.PartialProbe()):
        processor = StreamProcessor(Chain("c", [plugin]))
        [answer] = _run(processor, _headers("request_headers", {"content-length": str(8 * LIMIT)}))
        assert answer is not None and answer.WhichOneof("response") == "request_headers", plugin.name


def test_the_limit_is_the_processors_own() -> None:
    processor = _narrowed(buffer_limit=100)
    [answer] = _run(processor, _headers("request_headers", {"content-length": "101"}))
    assert answer is not None and answer.immediate_response.status.code == 413


def test_a_filter_that_buffers_too_leaves_the_limit_to_envoy() -> None:
    # Envoy answers 413 itself then, at its own limit, which a deployment may have raised past 1 MiB.
    processor = StreamProcessor(Chain("c", [tp.BufferedProbe()]))
    [answer] = _run(processor, _headers("request_headers", {"content-length": str(2 * LIMIT)}))
    assert answer is not None and answer.WhichOneof("response") == "request_headers"


def test_the_413_of_a_chain_narrowed_by_mode_override_is_that_chains() -> None:
    # The case that hung: the filter streams (another chain needs it), this chain's override asks for BUFFERED.
    registry = Registry([Chain("stream", [tp.StreamProbe()]), Chain("buffered", [tp.BufferedProbe()])])
    assert registry.mode.request_body_mode == BodyMode.STREAMED
    processor = StreamProcessor(registry.chains["buffered"], registry)
    [answer] = _run(processor, _headers("request_headers", {"content-length": str(LIMIT + 1)}))
    assert answer is not None and answer.immediate_response.status.code == 413
    streamed = StreamProcessor(registry.chains["stream"], registry)
    [answer] = _run(streamed, _headers("request_headers", {"content-length": str(LIMIT + 1)}))
    assert answer is not None and answer.WhichOneof("response") == "request_headers"


# ---- BUFFERED_PARTIAL: a chunk that is the whole body but not marked as its end -----------------------


class _Seen(Plugin):
    """BUFFERED_PARTIAL both ways: records each chunk's size and end flag; Responds on `deny` in a request."""

    name = "seen"
    request_body = BodyMode.BUFFERED_PARTIAL
    response_body = BodyMode.BUFFERED_PARTIAL

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, bool]] = []

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> Respond | None:
        self.seen.append((len(chunk), end))
        return Respond(403, b"no\n") if chunk.startswith(b"deny") else None

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
        self.seen.append((len(chunk), end))


def _whole_request_body_without_its_end(size: int) -> tuple[_Seen, pb.ProcessingResponse | None]:
    """A BUFFERED_PARTIAL request body of `size` bytes sent whole, its end not marked: the plugin and the answer."""
    plugin = _Seen()
    _, answer = _run(
        StreamProcessor(Chain("c", [plugin])),
        _headers("request_headers", {"content-length": str(size)}),
        _body("request_body", b"z" * size, end=False),
    )
    return plugin, answer


@pytest.mark.parametrize("size", [LIMIT, LIMIT + 1, 2 * LIMIT])
def test_a_whole_partial_request_body_without_its_end_is_seen_whole_then_refused(size: int) -> None:
    plugin, answer = _whole_request_body_without_its_end(size)
    assert plugin.seen == [(size, True)]  # the plugin sees what it is: the whole body
    assert answer is not None and answer.immediate_response.status.code == 413
    assert answer.immediate_response.details == "sidecar_body_over_buffer_limit"


@pytest.mark.parametrize("size", [1, 1000, LIMIT - 1])
def test_a_whole_partial_body_under_the_buffer_without_its_end_goes_on(size: int) -> None:
    # Envoy holds a body under its buffer whole; one sent without its end has trailers behind it (HTTP/2, gRPC).
    plugin, answer = _whole_request_body_without_its_end(size)
    assert plugin.seen == [(size, False)]
    assert answer is not None and answer.WhichOneof("response") == "request_body"


def test_a_plugins_own_reply_to_a_whole_partial_body_wins() -> None:
    processor = StreamProcessor(Chain("c", [_Seen()]))
    _, answer = _run(
        processor, _headers("request_headers", {"content-length": "4"}), _body("request_body", b"deny", end=False)
    )
    assert answer is not None and answer.immediate_response.status.code == 403


def test_a_whole_partial_response_body_without_its_end_is_a_500() -> None:
    plugin = _Seen()
    processor = StreamProcessor(Chain("c", [plugin]), buffer_limit=4096)
    answers = _run(
        processor,
        _headers("request_headers", {":method": "GET"}, end=True),
        _headers("response_headers", {":status": "200", "content-length": "5000"}),
        _body("response_body", b"r" * 5000, end=False),
    )
    assert plugin.seen == [(5000, True)]
    answer = answers[-1]
    assert answer is not None and answer.immediate_response.status.code == 500


@pytest.mark.parametrize(
    ("headers", "size", "end"),
    [
        ({"content-length": "5000"}, 4999, False),  # really partial: the rest goes on unprocessed
        ({"content-length": "5000"}, 5000, True),  # whole, and marked so
        ({}, 5000, False),  # no length announced: partial as far as anyone can tell
        ({"content-length": "x"}, 5000, False),
    ],
)
def test_other_partial_chunks_are_answered_as_before(headers: dict[str, str], size: int, end: bool) -> None:
    plugin = _Seen()
    processor = StreamProcessor(Chain("c", [plugin]))
    _, answer = _run(processor, _headers("request_headers", headers), _body("request_body", b"q" * size, end=end))
    assert plugin.seen == [(size, end)]
    assert answer is not None and answer.WhichOneof("response") == "request_body"


def test_a_streamed_chunk_as_long_as_the_body_is_not_refused() -> None:
    # STREAMED sends the end of the body as its own chunk, reliably: only BUFFERED_PARTIAL loses it.
    processor = StreamProcessor(Chain("c", [tp.StreamProbe()]))
    _, answer = _run(
        processor, _headers("request_headers", {"content-length": "10"}), _body("request_body", b"s" * 10, end=False)
    )
    assert answer is not None and answer.WhichOneof("response") == "request_body"


def test_an_empty_chunk_of_an_empty_body_is_not_refused() -> None:
    processor = StreamProcessor(Chain("c", [_Seen()]))
    _, answer = _run(
        processor, _headers("request_headers", {"content-length": "0"}), _body("request_body", b"", end=False)
    )
    assert answer is not None and answer.WhichOneof("response") == "request_body"
