"""The native module in a real Envoy: buffered and streamed bodies, both directions, and trailers."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
from collections.abc import Iterator

import pytest

from tests.support.inprocess_envoy import InProcessEnvoy, raw_exchange
from tests.support.inprocess_fake import MALFORMED

_CONTINUES = [(i, r) for i, r in enumerate(MALFORMED) if isinstance(r, tuple) and len(r) == 4 and r[0] == 0]
MALFORMED_BODY_TOO_LARGE = next(i for i, r in _CONTINUES if isinstance(r[2], bytes) and len(r[2]) > 1 << 20)
MALFORMED_BODY_STR = next(i for i, r in _CONTINUES if isinstance(r[2], str))

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def buffered() -> Iterator[InProcessEnvoy]:
    with InProcessEnvoy("buffered") as running:
        yield running


@pytest.fixture(scope="module")
def streamed() -> Iterator[InProcessEnvoy]:
    with InProcessEnvoy("streamed") as running:
        yield running


def _chunked(path: str, pieces: list[bytes], trailers: dict[str, str] | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".encode()
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces)
    tail = "".join(f"{k}: {v}\r\n" for k, v in (trailers or {}).items()).encode()
    return head + body + b"0\r\n" + tail + b"\r\n"


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _json_body(raw: bytes) -> dict[str, object]:
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    decoded: dict[str, object] = json.loads(body)
    return decoded


def test_buffered_request_body_is_replaced_once_with_the_headers_fixed(buffered: InProcessEnvoy) -> None:
    status, headers, body = buffered.request("/upper", method="POST", body=b"hello world")
    echo = json.loads(body)
    assert status == 200
    assert echo["body"] == "HELLO WORLD"
    assert echo["headers"]["content-length"] == "11"
    assert headers["x-request-body-calls"] == "1"


def test_buffered_body_sent_in_many_chunks_reaches_python_whole(buffered: InProcessEnvoy) -> None:
    pieces = [bytes([97 + i % 26]) * 1000 for i in range(300)]  # 300 kB in 300 chunks
    raw = raw_exchange(buffered.address, _chunked("/upper", pieces))
    assert _status(raw) == 200
    echo = _json_body(raw)
    whole = b"".join(pieces).upper()
    assert echo["body_sha256"] == hashlib.sha256(whole).hexdigest()
    assert echo["body_length"] == len(whole)
    assert b"x-request-body-calls: 1\r\n" in raw


def test_buffered_response_body_is_replaced(buffered: InProcessEnvoy) -> None:
    status, headers, body = buffered.request("/resp-upper")
    assert status == 200
    assert b'"PATH": "/RESP-UPPER"' in body
    assert headers["content-length"] == str(len(body))


def test_respond_from_the_body_phase(buffered: InProcessEnvoy) -> None:
    status, headers, _ = buffered.request("/body-respond", method="POST", body=b"x" * 100)
    assert status == 413
    assert "x-envoy-upstream-service-time" not in headers


@pytest.mark.parametrize("index", [*range(0, len(MALFORMED), 5), MALFORMED_BODY_TOO_LARGE, MALFORMED_BODY_STR])
def test_a_malformed_body_result_fails_closed(buffered: InProcessEnvoy, index: int) -> None:
    status, headers, _ = buffered.request(f"/malformed-body/{index}", method="POST", body=b"payload")
    assert status == 500
    assert "x-envoy-upstream-service-time" not in headers


def test_a_buffered_body_over_the_limit_is_refused_not_passed() -> None:
    with InProcessEnvoy("buffered", max_body_bytes=64 * 1024) as envoy:
        pieces = [b"a" * 16384] * 8  # 128 KiB, more than max_body_bytes, less than Envoy's own buffer limit
        raw = raw_exchange(envoy.address, _chunked("/upper", pieces))
        assert _status(raw) == 413
        assert b"HELLO" not in raw and b"AAAA" not in raw
        assert envoy.access_log(1)[0]["details"] == "sidecar_inprocess_body_too_large"
        assert envoy.request("/upper", method="POST", body=b"small")[0] == 200


def test_streamed_chunks_are_each_replaced(streamed: InProcessEnvoy) -> None:
    pieces = [b"abc" * 1000, b"def" * 1000, b"ghi" * 1000]
    raw = raw_exchange(streamed.address, _chunked("/upper", pieces))
    assert _status(raw) == 200
    echo = _json_body(raw)
    assert echo["body_sha256"] == hashlib.sha256(b"".join(pieces).upper()).hexdigest()


def test_streamed_response_chunks_are_replaced(streamed: InProcessEnvoy) -> None:
    status, _, body = streamed.request("/resp-upper")
    assert status == 200
    assert body == body.upper() and b'"PATH": "/RESP-UPPER"' in body


def test_streamed_header_ops_in_a_body_phase_fail_closed(streamed: InProcessEnvoy) -> None:
    # The headers went on before the body: a header op there cannot be honoured, so it is refused, not dropped.
    status, _, _ = streamed.request("/body-header-op", method="POST", body=b"x")
    assert status == 500


@pytest.mark.parametrize("mode", ["buffered", "streamed"])
def test_request_trailers_reach_python(mode: str, buffered: InProcessEnvoy, streamed: InProcessEnvoy) -> None:
    envoy = buffered if mode == "buffered" else streamed
    denied = raw_exchange(envoy.address, _chunked("/ok", [b"one", b"two"], {"x-deny": "1"}))
    assert _status(denied) == 403
    allowed = raw_exchange(envoy.address, _chunked("/ok", [b"one", b"two"], {"x-other": "1"}))
    assert _status(allowed) == 200
    # Buffered: the body's one call came before the trailers, with the whole body.
    if mode == "buffered":
        assert b"x-request-body-calls: 1\r\n" in allowed
        assert _json_body(allowed)["body"] == "onetwo"


def test_a_buffered_response_body_over_the_limit_is_refused_not_passed() -> None:
    with InProcessEnvoy("buffered", max_body_bytes=64 * 1024) as envoy:
        status, _, body = envoy.request("/bytes/200000")
        assert status == 500 and b"0123456789" not in body
        assert envoy.access_log(1)[0]["details"] == "sidecar_inprocess_body_too_large"


def test_a_streamed_response_chunk_over_the_limit_cuts_the_response() -> None:
    # The headers already went to the client: Envoy cannot answer 500 any more and resets the stream instead.
    with InProcessEnvoy("streamed", max_body_bytes=16 * 1024) as envoy:
        raw = raw_exchange(envoy.address, b"GET /bytes/200000 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        _, _, body = raw.partition(b"\r\n\r\n")
        assert len(body) < 200_000
        assert envoy.access_log(1)[0]["details"] == "sidecar_inprocess_body_too_large"


def test_a_streamed_request_chunk_over_the_limit_is_refused() -> None:
    with InProcessEnvoy("streamed", max_body_bytes=16 * 1024) as envoy:
        raw = raw_exchange(envoy.address, _chunked("/upper", [b"a" * 100_000]))
        assert _status(raw) == 413
        assert envoy.access_log(1)[0]["details"] == "sidecar_inprocess_body_too_large"


@pytest.fixture(scope="module")
def partial() -> Iterator[InProcessEnvoy]:
    with InProcessEnvoy("partial") as running:
        yield running


def _upstream_header(echo: dict[str, object], name: str) -> str:
    headers = echo["headers"]
    assert isinstance(headers, dict)
    return str(headers[name])


_ENVOY_BUFFER = 1 << 20  # Envoy's default per-connection buffer limit: what BUFFERED_PARTIAL stops at, as ext_proc


def test_partial_body_smaller_than_the_buffer_reaches_python_whole_once(partial: InProcessEnvoy) -> None:
    pieces = [b"abc" * 1000] * 5
    raw = raw_exchange(partial.address, _chunked("/partial-upper", pieces))
    assert _status(raw) == 200
    echo = _json_body(raw)
    whole = b"".join(pieces)
    assert echo["body_sha256"] == hashlib.sha256(whole.upper()).hexdigest()
    assert _upstream_header(echo, "x-partial-seen") == f"{len(whole)} whole"  # headers held until the body's one call
    assert b"x-request-body-calls: 1\r\n" in raw


@pytest.mark.parametrize("size", [_ENVOY_BUFFER + 1, 3 * _ENVOY_BUFFER, 12 << 20])
def test_partial_body_past_the_buffer_gives_python_the_first_part_and_the_rest_passes(
    partial: InProcessEnvoy, size: int
) -> None:
    """Past Envoy's buffer limit (and past max_body_bytes: 12 MiB), the hook gets what was buffered, once, with
    end_of_stream False; what it returns replaces that part; the rest goes upstream unprocessed, whole."""
    pieces = [bytes([97 + i % 26]) * 65536 for i in range(size // 65536)] + [b"z" * (size % 65536)]
    raw = raw_exchange(partial.address, _chunked("/partial-upper", [p for p in pieces if p]))
    assert _status(raw) == 200
    echo = _json_body(raw)
    seen, kind = _upstream_header(echo, "x-partial-seen").split()
    assert kind == "partial" and _ENVOY_BUFFER <= int(seen) < _ENVOY_BUFFER + (1 << 20)
    whole = b"".join(pieces)
    expected = whole[: int(seen)].upper() + whole[int(seen) :]
    assert echo["body_length"] == size
    assert echo["body_sha256"] == hashlib.sha256(expected).hexdigest()
    assert b"x-request-body-calls: 1\r\n" in raw


def test_partial_body_hook_can_reply_with_metadata() -> None:
    with InProcessEnvoy("partial") as envoy:
        with contextlib.suppress(ConnectionResetError):  # Envoy replies and closes while the upload goes on
            raw_exchange(envoy.address, _chunked("/partial-respond", [b"x" * 65536] * 40))  # 2.5 MiB
        entry = envoy.access_log(1)[0]
    assert (entry["code"], entry["details"]) == (403, "fake_partial_denied")
    assert _ENVOY_BUFFER <= entry["metadata"]["seen"] < 2 * _ENVOY_BUFFER


def test_partial_response_body_past_the_buffer() -> None:
    with InProcessEnvoy("partial") as envoy:
        status, _, small = envoy.request("/echo")
        assert status == 200
        status, _, large = envoy.request("/bytes/3000000")
        assert (status, len(large)) == (200, 3_000_000)
        first, second = (entry["metadata"]["response_seen"] for entry in envoy.access_log(2))
    assert first == f"{len(small)} whole"
    seen, kind = second.split()
    assert kind == "partial" and _ENVOY_BUFFER <= int(seen) < 2 * _ENVOY_BUFFER


def test_partial_request_with_trailers_gets_its_call_before_them(partial: InProcessEnvoy) -> None:
    raw = raw_exchange(partial.address, _chunked("/partial-upper", [b"one", b"two"], {"x-other": "1"}))
    assert _status(raw) == 200
    echo = _json_body(raw)
    assert echo["body"] == "ONETWO"
    assert _upstream_header(echo, "x-partial-seen") == "6 partial"  # trailers follow: the body alone is not the end


def _keep_alive_exchange(envoy: InProcessEnvoy, requests: list[tuple[str, str, bytes]]) -> list[tuple[int, str]]:
    """Requests one after the other on one HTTP/1.1 connection: (status, its `connection` header) for each."""
    conn = http.client.HTTPConnection(*envoy.address, timeout=15)
    seen = []
    try:
        for method, path, body in requests:
            conn.request(method, path, body=body)
            answer = conn.getresponse()
            answer.read()
            seen.append((answer.status, answer.getheader("connection") or ""))
    finally:
        conn.close()
    return seen


@pytest.mark.parametrize("mode", ["buffered", "streamed"])
def test_a_reply_before_the_request_ends_keeps_the_connection_open(
    mode: str, buffered: InProcessEnvoy, streamed: InProcessEnvoy
) -> None:
    """A reply made while the request is still arriving (from its headers hook, or its first streamed chunk's)
    goes out once Envoy has read what the client sent, as under ext_proc: the HTTP/1.1 connection stays open
    (it used to get `connection: close`), and the next request on it is served."""
    envoy = buffered if mode == "buffered" else streamed
    body = b"q" * 20_000
    seen = _keep_alive_exchange(
        envoy,
        [("POST", "/respond", body), ("POST", "/chunk-respond", body), ("POST", "/ok", body), ("GET", "/ok", b"")],
    )
    assert seen == [(403, ""), (403, ""), (200, ""), (200, "")]


def test_a_reply_to_an_upload_still_arriving_lets_nothing_through(streamed: InProcessEnvoy) -> None:
    """A large upload refused at its first chunk: the reply waits one loop turn, the rest is dropped, not passed;
    the upstream never gets the body (its echo would answer 200)."""
    with contextlib.suppress(ConnectionResetError):
        raw = raw_exchange(streamed.address, _chunked("/chunk-respond", [b"w" * 65536] * 64))  # 4 MiB
        assert _status(raw) == 403
        assert b"x-denied: chunk" in raw and b"wwww" not in raw
    assert streamed.request("/ok")[0] == 200
