"""A STREAMED request body: do the request headers reach the upstream before the first chunk's hook has decided?
The ext_proc path is the reference (Envoy's own filter + `sidecar serve`); the in-process filter must do the same.

Measured: Envoy's ext_proc does not hold them. Once the headers hook has answered, the headers go upstream while
the body is still to come, and a reply from the first chunk's hook then resets a request the upstream has started
to see. So the in-process filter does not hold them either (contract item 4 applies only if ext_proc holds)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.testing import EnvoyHarness
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

TP = "tests.support.testplugins:"


class RecordingUpstream:
    """Accepts connections on 127.0.0.1 and records every byte it receives; never answers."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self.received = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(65536):
                with self._lock:
                    self.received += chunk

    def seen(self) -> bytes:
        with self._lock:
            return bytes(self.received)

    def close(self) -> None:
        self._sock.close()


def _arrives(condition: Callable[[], bool], within: float) -> bool:
    """Whether `condition` becomes true within `within` seconds (a window: the thing checked must NOT happen)."""
    try:
        wait_for(condition, timeout=within, what="the upstream")
    except AssertionError:
        return False
    return True


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    recording = RecordingUpstream()
    yield recording
    recording.close()


@pytest.mark.parametrize("in_process", [False, True], ids=["ext_proc", "in_process"])
def test_streamed_request_headers_go_upstream_before_the_first_chunk_as_under_ext_proc(
    in_process: bool,
    upstream: RecordingUpstream,
    sidecar_envoy: Callable[..., EnvoyHarness],
    tmp_path: Path,
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(f'chains:\n  gate: {{plugins: [{{use: "{TP}ChunkGate", config: {{limit: 0}}}}]}}\n')
    env = sidecar_envoy(config=config, routes=["/=gate"], upstream=upstream.address, in_process=in_process)
    host, port = env.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as client:
        client.sendall(b"POST /upload HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
        # No body yet: a filter that held the headers for the first chunk's result would send nothing upstream.
        early = _arrives(lambda: b"/upload" in upstream.seen(), within=2.0)
        client.sendall(b"5\r\nhello\r\n")
        answer = client.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413")
    assert early
    assert b"hello" not in upstream.seen()  # the chunk the hook refused never went on
