"""The demo backend: what it answers, and that each response leaves in one write with Nagle off.

Written as two writes (headers, then body) on a keep-alive connection, the body waited for the
client's delayed ACK of the headers: 40+ ms per request behind `sidecar up`. The tests count the
server's writes per response instead of timing anything.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import pytest

from sidecar.stack.demo import EchoBackend, pattern_bytes


class _Writes:
    """Every send/sendall the backend makes on its accepted sockets: (TCP_NODELAY, byte count)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls: list[tuple[int, int]] = []

    def record(self, sock: socket.socket, data: object) -> None:
        try:
            local_port = sock.getsockname()[1]
        except OSError:
            return
        if sock.family == socket.AF_INET and local_port == self.port:
            self.calls.append((sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), len(memoryview(data))))  # type: ignore[arg-type]


@pytest.fixture
def backend_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EchoBackend, _Writes]]:
    with EchoBackend() as backend:
        writes = _Writes(backend.address[1])
        send, sendall = socket.socket.send, socket.socket.sendall

        def recording_send(sock: socket.socket, data: bytes, *flags: int) -> int:
            writes.record(sock, data)
            return send(sock, data, *flags)

        def recording_sendall(sock: socket.socket, data: bytes, *flags: int) -> None:
            writes.record(sock, data)
            sendall(sock, data, *flags)

        monkeypatch.setattr(socket.socket, "send", recording_send)
        monkeypatch.setattr(socket.socket, "sendall", recording_sendall)
        yield backend, writes


def test_each_keep_alive_response_is_one_write_with_nagle_off(backend_writes: tuple[EchoBackend, _Writes]) -> None:
    backend, writes = backend_writes
    connection = http.client.HTTPConnection(*backend.address, timeout=10)
    try:
        bodies = [b"", b"x" * 10, b"y" * 5000]
        for index, body in enumerate(bodies):
            connection.request("POST", f"/status/20{index}", body=body, headers={"content-type": "text/plain"})
            response = connection.getresponse()
            echo = json.loads(response.read())
            assert response.status == 200 + index
            assert echo["body_length"] == len(body)
            assert response.getheader("connection") != "close"
    finally:
        connection.close()
    assert len(writes.calls) == len(bodies), writes.calls
    assert all(nodelay for nodelay, _ in writes.calls), writes.calls


def test_head_answers_headers_only_in_one_write(backend_writes: tuple[EchoBackend, _Writes]) -> None:
    backend, writes = backend_writes
    connection = http.client.HTTPConnection(*backend.address, timeout=10)
    try:
        connection.request("HEAD", "/anything")
        response = connection.getresponse()
        assert response.read() == b""
        assert int(response.getheader("content-length") or 0) > 0
    finally:
        connection.close()
    assert len(writes.calls) == 1
    assert writes.calls[0][0]


def test_streams_still_stream_and_large_bodies_arrive_whole() -> None:
    with EchoBackend() as backend:
        connection = http.client.HTTPConnection(*backend.address, timeout=10)
        try:
            connection.request("GET", "/lines/3")
            response = connection.getresponse()
            assert response.getheader("transfer-encoding") == "chunked"
            assert [json.loads(line) for line in response.read().splitlines()] == [{"line": i} for i in range(3)]
            size = 200 * 1024 + 7
            connection.request("GET", f"/bytes/{size}")
            response = connection.getresponse()
            assert response.read() == b"".join(pattern_bytes(size))
            connection.request("POST", "/reflect", body=b"abc" * 30000, headers={"content-type": "x/y"})
            response = connection.getresponse()
            assert response.getheader("content-type") == "x/y"
            assert response.read() == b"abc" * 30000
        finally:
            connection.close()
