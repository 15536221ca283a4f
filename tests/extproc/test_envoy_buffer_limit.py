"""Uploads around Envoy's 1 MiB buffer through real Envoy 1.40 and `sidecar serve`: every one ends, promptly,
with a clear status (the report: BUFFERED_PARTIAL never answering, BUFFERED hanging or answering 500).

Which of Envoy's paths a request takes depends on timing (did the body reach Envoy before the headers answer?),
so each case is sent a few times, on a fresh connection each, and every outcome is checked against what the
sidecar promises: a reply within the bound, never the client's own timeout. The `Slow` plugin holds the headers
answer back 0.1 s, so the body is in Envoy first: the path that hung. docs/streaming.md has the figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.testing import EnvoyHarness
from tests.support.testplugins import TP

pytestmark = pytest.mark.envoy

MiB = 1024 * 1024
STREAM_TIMEOUT = 2.0
#: Beyond the wait the sidecar allows itself (stream_timeout): Envoy's reply, a loaded machine.
SLACK = 2.0
TRIES = 3
CONFIG = f"""\
message_timeout: 0.5
stream_timeout: {STREAM_TIMEOUT}
chains:
  stream: {{plugins: ["{TP}StreamProbe"]}}
  buffered: {{plugins: ["{TP}Slow", "{TP}BufferedProbe"]}}
  partial: {{plugins: ["{TP}PartialProbe"]}}
  slowpartial: {{plugins: ["{TP}Slow", "{TP}PartialProbe"]}}
"""
CHAINS = ("stream", "buffered", "partial", "slowpartial")


@pytest.fixture
def env(sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path) -> EnvoyHarness:
    config = tmp_path / "sidecar.yaml"
    config.write_text(CONFIG)
    return sidecar_envoy(config=config, routes=[f"/{chain}/={chain}" for chain in CHAINS])


def _pieces(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _post(env: EnvoyHarness, chain: str, size: int, *, http2: bool, chunked: bool) -> tuple[httpx.Response, float]:
    body = b"u" * size
    content: Any = _pieces(body) if chunked else body
    started = time.monotonic()
    with httpx.Client(http1=not http2, http2=http2, timeout=STREAM_TIMEOUT + 10) as client:
        response = client.post(f"{env.url}/{chain}/echo", content=content, headers={"x-delay": "0.1"})
    return response, time.monotonic() - started


def _passed_whole(response: httpx.Response, size: int) -> bool:
    return response.status_code == 200 and response.json()["body_length"] == size


SHAPES = [(False, False), (False, True), (True, False), (True, True)]  # (http2, chunked)


# Chunked over HTTP/1 is left out: when the body reaches Envoy before the headers answer, Envoy 1.40 may stop
# reading and answer nothing until its own stream_idle_timeout (docs/streaming.md). The sidecar cannot tell that
# stall from a slow client whose body Envoy is buffering, so it does not cut the stream itself.
@pytest.mark.parametrize(("http2", "chunked"), [shape for shape in SHAPES if shape != (False, True)])
def test_buffered_uploads_past_the_buffer_end_promptly(env: EnvoyHarness, http2: bool, chunked: bool) -> None:
    # Before: HTTP/1 hung (Envoy read 1 MiB, stopped reading, never replied) or passed 2 MiB it should refuse.
    for _ in range(TRIES):
        response, took = _post(env, "buffered", 2 * MiB, http2=http2, chunked=chunked)
        assert took < STREAM_TIMEOUT + SLACK, (response.status_code, took)
        if not chunked:  # a known length: the sidecar answers at the headers, whatever Envoy would do
            assert response.status_code == 413 and response.text == "Payload Too Large\n"
        else:  # HTTP/2: Envoy buffers a stream past the connection's limit and never stalls on it
            assert _passed_whole(response, 2 * MiB)


@pytest.mark.parametrize(("http2", "chunked"), SHAPES)
def test_buffered_uploads_within_the_buffer_pass(env: EnvoyHarness, http2: bool, chunked: bool) -> None:
    for size in (1000, MiB):
        response, _ = _post(env, "buffered", size, http2=http2, chunked=chunked)
        assert _passed_whole(response, size)
        assert response.headers["x-body-seen"] == str(size)


@pytest.mark.parametrize("chain", ["partial", "slowpartial"])
@pytest.mark.parametrize(("http2", "chunked"), SHAPES)
def test_buffered_partial_uploads_past_the_buffer_end_promptly(
    env: EnvoyHarness, chain: str, http2: bool, chunked: bool
) -> None:
    # Before: HTTP/1 with a content-length hung about half the time (Envoy lost the end of the body).
    for _ in range(TRIES):
        response, took = _post(env, chain, 2 * MiB, http2=http2, chunked=chunked)
        assert took < 1 + SLACK, (response.status_code, took)  # no deadline involved: an answer at once
        if response.status_code == 413:  # the whole body came without its end: what Envoy would lose
            assert not chunked and response.text == "Payload Too Large\n"
            continue
        assert _passed_whole(response, 2 * MiB)
        seen, whole = response.headers["x-partial"].split()
        assert 0 < int(seen) <= 2 * MiB and whole in ("whole", "partial")
        if whole == "whole":
            assert int(seen) == 2 * MiB


def test_streamed_uploads_are_untouched(env: EnvoyHarness) -> None:
    for http2, chunked in SHAPES:
        response, _ = _post(env, "stream", 2 * MiB, http2=http2, chunked=chunked)
        assert _passed_whole(response, 2 * MiB)
        chunks, size = map(int, response.headers["x-body-seen"].split())
        assert size == 2 * MiB and chunks >= 1
