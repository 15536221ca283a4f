"""The streaming reference plugins, in-process through every mode they run in."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from sidecar.testing import Driver, Request, Response
from sidecar_plugins.digest import BodyDigest
from sidecar_plugins.jsonl import JsonlTag
from sidecar_plugins.sse import SseMeter
from sidecar_plugins.stream_redact import StreamRedact

CARD = "4111-1111-1111-1111"


def split_everywhere(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(data):
        step = rng.randint(1, 7)
        chunks.append(data[i : i + step])
        i += step
    return chunks


@pytest.mark.parametrize("seed", range(20))
def test_stream_redact_matches_across_any_chunk_boundary(seed: int) -> None:
    text = f"a {CARD} b {CARD}{CARD} c 4111-1111 {CARD[:-1]}".encode()
    result = Driver([StreamRedact({"pattern": CARD, "replacement": "XXXX"})]).run(
        Request("POST", body=split_everywhere(text, seed)), Response(body=split_everywhere(text, seed + 100))
    )
    expected = text.replace(CARD.encode(), b"XXXX")
    assert result.upstream is not None and result.upstream.body == expected
    assert result.response.body == expected
    # one answer per chunk, and one for the empty chunk that ends a body without a content-length
    assert result.phases.count("request_body") == len(split_everywhere(text, seed)) + 1


def test_stream_redact_direction_and_config() -> None:
    driver = Driver([StreamRedact({"pattern": "x", "direction": "response"})])
    result = driver.run(Request("POST", body=b"x"), Response(body=[b"ax", b"x"]))
    assert result.upstream is not None and result.upstream.body == b"x"
    assert result.response.body == b"a**"
    with pytest.raises(ValueError, match="pattern"):
        StreamRedact({"pattern": ""})


def test_body_digest_streams_and_publishes() -> None:
    body = bytes(range(256)) * 1000
    chunks = [body[i : i + 10_000] for i in range(0, len(body), 10_000)]
    result = Driver([BodyDigest()]).run(Request("POST", body=chunks))
    meta = result.dynamic_metadata["envoy-sidecar"]
    assert meta["request_body_sha256"] == hashlib.sha256(body).hexdigest()
    assert meta["request_body_bytes"] == len(body)
    assert result.upstream is not None and result.upstream.body == body


def test_body_digest_as_trailer() -> None:
    result = Driver([BodyDigest()]).run(Request("POST", body=[b"ab", b"c"], trailers={"x-t": "1"}))
    assert result.upstream is not None
    assert result.upstream.trailers["x-body-sha256"] == hashlib.sha256(b"abc").hexdigest()


def test_jsonl_tag_rewrites_lines_split_across_chunks() -> None:
    lines = b'{"a":1}\n{"b":2}\nnot json\n{"c":3}'
    result = Driver([JsonlTag({"field": "tag", "value": 7})]).run(
        Request(),
        Response(
            headers={"content-type": "application/x-ndjson", "content-length": str(len(lines))},
            body=split_everywhere(lines, 3),
        ),
    )
    assert result.failed is None
    assert result.response.body == b'{"a":1,"tag":7}\n{"b":2,"tag":7}\nnot json\n{"c":3,"tag":7}'
    assert "content-length" not in result.response.headers


def test_jsonl_tag_passes_other_types_and_ends_with_trailers() -> None:
    result = Driver([JsonlTag()]).run(
        Request(), Response(headers={"content-type": "text/plain"}, body=[b"a\n", b"b"], trailers={"x": "1"})
    )
    assert result.response.body == b"a\nb"
    assert result.response.trailers["x"] == "1"


def test_sse_meter_counts_openai_style_events() -> None:
    events = [
        {"choices": [{"delta": {"content": "Hello there"}}]},
        {"choices": [{"delta": {"content": ", world!"}}]},
        {"choices": [], "usage": {"total_tokens": 42}},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    result = Driver([SseMeter()]).run(
        Request(), Response(headers={"content-type": "text/event-stream"}, body=split_everywhere(stream, 9))
    )
    assert result.response.body == stream
    assert result.dynamic_metadata["envoy-sidecar"] == {
        "sse_events": 4,
        "sse_words": 4,
        "sse_chars": len("Hello there, world!"),
        "sse_done": True,
        "sse_usage_total_tokens": 42,
    }


def test_sse_meter_ignores_other_content() -> None:
    result = Driver([SseMeter()]).run(Request(), Response(headers={"content-type": "text/plain"}, body=b"data: 1\n"))
    assert result.dynamic_metadata == {}
