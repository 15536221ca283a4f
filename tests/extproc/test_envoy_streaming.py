"""Streaming body modes end to end: real Envoy 1.40, `sidecar serve`, the demo backend."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.connection
import h2.events
import httpx
import pytest

from sidecar.stack.demo import pattern_bytes
from sidecar.testing import EnvoyHarness
from tests.support.testplugins import TP
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

Factory = Callable[..., EnvoyHarness]
CARD = b"4111-1111-1111-1111"
MiB = 1024 * 1024


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return path


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def body_with_cards(size: int) -> bytes:
    unit = b"x" * 1000 + CARD + b"y" * 37
    return (unit * (size // len(unit) + 1))[:size]


def redactor(tmp_path: Path, direction: str) -> Path:
    return config(
        tmp_path,
        f"plugins:\n  - use: stream-redact\n    config: {{pattern: '{CARD.decode()}', "
        f"replacement: '####', direction: {direction}}}\n",
    )


@pytest.mark.parametrize("size", [0, 1, 1000, 12 * MiB + 123])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_streamed_request_redaction(sidecar_envoy: Factory, tmp_path: Path, size: int, framing: str) -> None:
    env = sidecar_envoy(config=redactor(tmp_path, "request"))
    body = body_with_cards(size)
    content: Any = body if framing == "content-length" else pieces(body, 65_536 + 17)
    response = httpx.post(env.url + "/upload", content=content, timeout=60)
    assert response.status_code == 200, response.text
    echoed = response.json()
    expected = body.replace(CARD, b"####")
    assert echoed["body_length"] == len(expected)
    assert echoed["body_sha256"] == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("http2", [False, True])
def test_streamed_response_redaction_over_http1_and_http2(sidecar_envoy: Factory, tmp_path: Path, http2: bool) -> None:
    env = sidecar_envoy(config=redactor(tmp_path, "response"))
    body = body_with_cards(3 * MiB)
    with httpx.Client(http1=not http2, http2=http2, timeout=60) as client:
        response = client.post(env.url + "/reflect", content=pieces(body, 50_000))
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert response.status_code == 200
    assert response.content == body.replace(CARD, b"####")


def test_full_duplex_response_rewrite_changes_length(sidecar_envoy: Factory, tmp_path: Path) -> None:
    env = sidecar_envoy(config=config(tmp_path, "plugins:\n  - use: jsonl-tag\n    config: {field: via, value: sc}\n"))
    for http2 in (False, True):
        with httpx.Client(http1=not http2, http2=http2, timeout=30) as client:
            response = client.get(env.url + "/lines/500")
        assert response.status_code == 200
        assert "content-length" not in response.headers
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert lines == [{"line": i, "via": "sc"} for i in range(500)]
    # other content passes untouched, through the same FULL_DUPLEX filter
    echoed = httpx.post(env.url + "/echo", content=b"plain").json()
    assert echoed["body"] == "plain"


def test_full_duplex_request_transform(sidecar_envoy: Factory) -> None:
    env = sidecar_envoy(plugins=[TP + "FdUpper"])
    body = b"".join(pattern_bytes(5 * MiB + 7))
    response = httpx.post(env.url + "/upload", content=pieces(body, 100_000), timeout=60)
    echoed = response.json()
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body.upper()).hexdigest()
    assert "content-length" not in echoed["headers"]


def test_full_duplex_pass_through_is_byte_exact_at_frame_and_message_edges(sidecar_envoy: Factory) -> None:
    """FULL_DUPLEX chunks go back to Envoy encoded by hand and written as views (`encoding.encode_streamed`,
    `Call.send`), and come in parsed as views of the socket's reads: sizes around HTTP/2 frame (16 KiB),
    varint-length and Envoy read (1 MiB) edges must arrive byte for byte, both ways."""
    env = sidecar_envoy(plugins=[TP + "FdPass"])
    sizes = [0, 1, 127, 128, 16_379, 16_384, 16_385, 2**21 - 30, MiB + 3, 3 * MiB + 1]
    with httpx.Client(timeout=60) as client:
        for size in sizes:
            body = b"".join(pattern_bytes(size))
            echoed = client.post(env.url + "/upload", content=pieces(body, 65_536)).json()
            assert (echoed["body_length"], echoed["body_sha256"]) == (size, hashlib.sha256(body).hexdigest()), size
            response = client.get(env.url + f"/bytes/{size}")
            assert response.content == body, size


def test_full_duplex_stall_costs_a_500_within_the_deadline(sidecar_envoy: Factory, tmp_path: Path) -> None:
    env = sidecar_envoy(config=config(tmp_path, f"stream_timeout: 1\nplugins: ['{TP}FdStall']\n"))
    outcome: dict[str, Any] = {}

    def stalled() -> None:
        started = time.monotonic()
        try:
            with httpx.Client(timeout=20) as client, client.stream("GET", env.url + "/stall") as response:
                outcome["status"] = response.status_code
                response.read()
        except httpx.HTTPError as exc:
            outcome["error"] = type(exc).__name__
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=stalled)
    thread.start()
    # meanwhile, other streams are served
    assert httpx.get(env.url + "/fine").status_code == 200
    thread.join(30)
    assert not thread.is_alive()
    # The status line may already be out (200) when the body stalls: then the body is cut, never hangs.
    assert outcome.get("status") == 500 or "error" in outcome, outcome
    assert outcome["seconds"] < 10
    assert "did not finish the body" in env.sidecar.logs()  # type: ignore[union-attr]
    assert httpx.get(env.url + "/fine").status_code == 200


def test_immediate_response_and_failures_mid_upload(sidecar_envoy: Factory, tmp_path: Path) -> None:
    env = sidecar_envoy(
        config=config(
            tmp_path,
            f"""
chains:
  default: {{on_error: fail_closed, plugins: [{{use: "{TP}ChunkGate", config: {{limit: 200000}}}}]}}
  open: {{on_error: fail_open, plugins: [{{use: "{TP}ChunkGate", config: {{limit: 200000}}}}]}}
""",
        ),
        routes=["/=default", "/open=open"],
    )
    too_big = httpx.post(env.url + "/up", content=pieces(b"a" * MiB, 10_000), timeout=30)
    assert too_big.status_code == 413
    assert too_big.text == "upload too large\n"
    closed = httpx.post(env.url + "/up", content=iter([b"a" * 100, b"boom", b"c" * 100]), timeout=30)
    assert closed.status_code == 500 and "x-sidecar-error-id" in closed.headers
    opened = httpx.post(env.url + "/open", content=iter([b"a" * 100, b"boom", b"c" * 100]), timeout=30)
    assert opened.status_code == 200
    assert opened.json()["body_length"] == 204


def h2_request_with_trailers(url: str, path: str, body: bytes, trailers: list[tuple[str, str]]) -> dict[str, Any]:
    """HTTP/2 (prior knowledge) POST with request trailers; httpx cannot send those."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream, [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", f"{host}:{port}")]
        )
        conn.send_data(stream, body)
        conn.send_headers(stream, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        result: dict[str, Any] = {"headers": {}, "body": b""}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    result["headers"] = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    result["body"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    return result
            sock.sendall(conn.data_to_send())
        raise AssertionError("no complete HTTP/2 response")


def add_response_header(name: str, value: str) -> Callable[[dict[str, Any]], None]:
    def hook(bootstrap: dict[str, Any]) -> None:
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        vhost = hcm["route_config"]["virtual_hosts"][0]
        vhost["response_headers_to_add"] = [{"header": {"key": name, "value": value}}]

    return hook


def test_body_digest_with_and_without_trailers(sidecar_envoy: Factory, tmp_path: Path) -> None:
    cfg = config(tmp_path, f"plugins: [body-digest, '{TP}AddHeaders']\n")
    env = sidecar_envoy(
        config=cfg,
        bootstrap_hook=add_response_header("x-digest", "%DYNAMIC_METADATA(envoy-sidecar:request_body_sha256)%"),
    )
    body = b"".join(pattern_bytes(300_000))
    plain = httpx.post(env.url + "/", content=pieces(body, 30_000), timeout=30)
    assert plain.headers["x-digest"] == hashlib.sha256(body).hexdigest()

    trailed = h2_request_with_trailers(env.url, "/t", b"hello", [("x-client-trailer", "1")])
    assert trailed["headers"][":status"] == "200"
    assert trailed["headers"]["x-digest"] == hashlib.sha256(b"hello").hexdigest()


@pytest.mark.parametrize(
    ("plugins", "transform"),
    [(["ChunkUpperTally"], bytes.upper), (["UpperBody", "BodyLengths"], lambda body: body.upper() * 2)],
    ids=["STREAMED", "BUFFERED"],
)
def test_a_new_body_and_metadata_reach_envoy_as_one_answer(
    sidecar_envoy: Factory, plugins: list[str], transform: Callable[[bytes], bytes]
) -> None:
    """A body hook that replaces the body, and metadata set with it: the sidecar writes the rest of the answer,
    then the new body's field after it (`processor._new_body`); Envoy must read both, and a BUFFERED body's
    new content-length, as one answer."""
    env = sidecar_envoy(
        plugins=[TP + plugin for plugin in plugins],
        bootstrap_hook=add_response_header("x-body-bytes", "%DYNAMIC_METADATA(envoy-sidecar:request_body_bytes)%"),
    )
    body = b"".join(pattern_bytes(400_000)).lower()  # doubled, still within Envoy's 1 MiB body buffer
    expected = transform(body)
    response = httpx.post(env.url + "/upload", content=body, timeout=30)
    assert response.status_code == 200, response.text
    # UpperBody replaces the response too: the echo behind its prefix, with a content-length Envoy took.
    wrapped = "UpperBody" in plugins
    assert response.content.startswith(b"wrapped:") == wrapped
    assert int(response.headers["content-length"]) == len(response.content)
    echoed = json.loads(response.content.removeprefix(b"wrapped:"))
    assert echoed["body_sha256"] == hashlib.sha256(expected).hexdigest()
    assert echoed["body_length"] == len(expected)
    assert response.headers["x-body-bytes"] == str(len(expected))


def test_sse_meter_feeds_access_logs(sidecar_envoy: Factory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    def access_log(bootstrap: dict[str, Any]) -> None:
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(log),
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "%REQ(:PATH)% events=%DYNAMIC_METADATA(envoy-sidecar:sse_events)% "
                            "words=%DYNAMIC_METADATA(envoy-sidecar:sse_words)% "
                            "done=%DYNAMIC_METADATA(envoy-sidecar:sse_done)%\n"
                        }
                    },
                },
            }
        ]

    env = sidecar_envoy(plugins=["sse-meter"], bootstrap_hook=access_log)
    with httpx.Client(timeout=30) as client, client.stream("GET", env.url + "/sse/25") as response:
        text = b"".join(response.iter_bytes())
    assert text.count(b"data:") == 26
    wait_for(lambda: log.exists() and "events=" in log.read_text(), 10, "the access log line")
    assert "/sse/25 events=26 words=25 done=true" in log.read_text()


def test_buffered_partial_sees_up_to_the_buffer_limit(sidecar_envoy: Factory) -> None:
    env = sidecar_envoy(plugins=[TP + "PartialProbe"])
    small = httpx.post(env.url + "/", content=b"a" * 10_000, timeout=30)
    assert small.headers["x-partial"] == "10000 whole"
    big = b"b" * (3 * MiB)
    large = httpx.post(env.url + "/", content=pieces(big, 64 * 1024), timeout=30)
    seen, whole = large.headers["x-partial"].split()
    # Envoy sends what it holds once past its 1 MiB buffer limit; by then it may have read well past the
    # limit (seen: up to 2.02 MiB), so the bound that holds is "not the whole body".
    assert whole == "partial" and 0 < int(seen) < len(big)
    assert large.json()["body_sha256"] == hashlib.sha256(big).hexdigest()  # the rest went on unprocessed


def test_observe_only_plugins_run_off_the_request_path(sidecar_envoy: Factory, tmp_path: Path) -> None:
    seen = tmp_path / "seen.txt"
    cfg = config(tmp_path, f"plugins:\n  - use: '{TP}SlowObserver'\n    config: {{delay: 1.5, file: '{seen}'}}\n")
    env = sidecar_envoy(config=cfg)
    hcm = env.bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][0]["typed_config"]["observability_mode"] is True
    started = time.monotonic()
    assert httpx.get(env.url + "/observed", timeout=10).status_code == 200
    assert time.monotonic() - started < 1.0  # Envoy did not wait for the 1.5 s hook
    wait_for(lambda: seen.exists() and "/observed" in seen.read_text(), 15, "the observer to run")


def test_full_duplex_failing_after_its_first_output_ends_the_response_promptly(sidecar_envoy: Factory) -> None:
    # Issue 14: headers and the first chunk are out when the plugin raises. The sidecar fails the gRPC stream
    # (INTERNAL); Envoy's local reply cannot replace a response under way, so it resets the stream (HTTP/2)
    # or closes the connection after its delayed-close wait of 1 s (HTTP/1). Never a wait for the client's
    # own timeout, and never a complete-looking response.
    env = sidecar_envoy(plugins=[TP + "FdYieldThenRaise"])
    for http2, path in [(False, "/lines/50"), (True, "/lines/50"), (False, "/sse/5"), (True, "/")]:
        started = time.monotonic()
        received = b""
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.Client(timeout=20, http1=not http2, http2=http2) as client,
            client.stream("GET", env.url + path) as response,
        ):
            assert response.status_code == 200
            for piece in response.iter_raw():
                received += piece
        assert time.monotonic() - started < 5, (http2, path)  # the stream deadline is 10 s, the client's 20 s
        assert received, (http2, path)  # the first chunk went out before the failure


def _ext_proc_counter(env: EnvoyHarness, name: str) -> int:
    assert env.envoy is not None
    text = httpx.get(env.envoy.admin_url + f"/stats?filter=ext_proc\\..*\\.{name}$").text
    (line,) = text.splitlines()
    return int(line.rpartition(":")[2])


def test_full_duplex_small_outputs_reach_envoy_merged_and_exact(sidecar_envoy: Factory) -> None:
    """FdUpper yields 1000-byte pieces: 2,098 of them for this body. Those waiting together reach Envoy as
    one `streamed_response` (Envoy parses, times and forwards every message), byte for byte and in order,
    with the end of the body on the last; Envoy's own counter shows how few messages it had to take."""
    env = sidecar_envoy(plugins=[TP + "FdUpper"])
    body = b"".join(pattern_bytes(2 * MiB + 5))
    echoed = httpx.post(env.url + "/upload", content=pieces(body, 100_000), timeout=60).json()
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body.upper()).hexdigest()
    received = _ext_proc_counter(env, "stream_msgs_received")
    assert 3 <= received <= 2 + len(body) // 100_000 + 1  # the headers answers, at most one a chunk, the end
