"""A module's callout goes to a real upstream: bounded in time, and refused (not a traceback) when not HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sidecar.wasm.host.state import HttpCall
from sidecar.wasm.host.upstream import cluster_responder


@pytest.fixture
def dripping() -> Iterator[str]:
    """An upstream that sends its status line one byte every 0.2 s, forever (until the test ends)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            for byte in b"HTTP/1.1 200 OK\r\n" * 100:
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()
    thread.join(5)


def _call(headers: list[tuple[str, str]], timeout_ms: int) -> HttpCall:
    return HttpCall(1, 1, "up", headers, b"", [], timeout_ms)


def test_an_upstream_dripping_its_headers_cannot_outlive_the_callout_timeout(dripping: str) -> None:
    respond = cluster_responder({"up": dripping})
    started = time.monotonic()
    answer = respond(_call([(":method", "GET"), (":path", "/"), (":authority", "up")], 1000))
    assert time.monotonic() - started < 3
    assert answer is not None and dict(answer.headers)[":status"] == "504"


@pytest.mark.parametrize(
    "headers",
    [
        [(":method", "GET\r\nX: 1"), (":path", "/")],
        [(":method", "GET"), (":path", "/"), ("bad:name", "v")],
        [(":method", "GET"), (":path", "/"), ("x-v", "a\nb")],
    ],
    ids=["method", "name", "value"],
)
def test_a_callout_that_is_not_http_fails_as_envoy_would_not_with_a_traceback(
    dripping: str, headers: list[tuple[str, str]]
) -> None:
    answer = cluster_responder({"up": dripping})(_call(headers, 1000))
    assert answer is not None and dict(answer.headers)[":status"] == "503"
