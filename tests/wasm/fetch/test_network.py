"""Timeouts and TLS: a server that never answers, and HTTPS with a private CA bundle."""

from __future__ import annotations

import hashlib
import http.server
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.wasm_fetch import assert_user_error, cache_files, make_module, pull_json, run


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listening socket nobody reads from: connections succeed, answers never come."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


def test_silent_registry_times_out(silent_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = f"127.0.0.1:{silent_port}"
    start = time.monotonic()
    code, _, err = run(
        capsys,
        "wasm",
        "pull",
        f"{host}/x/y:1",
        "--cache-dir",
        str(tmp_path),
        "--insecure-registry",
        host,
        "--timeout",
        "1",
    )
    assert time.monotonic() - start < 5
    assert_user_error(code, err, "did not answer in time")


def test_silent_url_respects_overall_deadline(
    silent_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = f"127.0.0.1:{silent_port}"
    start = time.monotonic()
    limits = ("--timeout", "1", "--deadline", "2.5", "--retries", "50")
    url = f"http://{host}/m.wasm"
    code, _, err = run(capsys, "wasm", "pull", url, "--cache-dir", str(tmp_path), "--insecure-registry", host, *limits)
    assert time.monotonic() - start < 6
    assert code == 2, err
    assert cache_files(tmp_path) == []


@pytest.fixture
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, bytes]]:
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    module = make_module(700, seed="tls")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(module)))
            self.end_headers()
            self.wfile.write(module)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/m.wasm", cert, module
    finally:
        server.shutdown()
        server.server_close()


def test_https_url_with_private_ca(
    https_server: tuple[str, Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, ca, module = https_server
    code, _, err = run(capsys, "wasm", "pull", url, "--cache-dir", str(tmp_path), "--retries", "0")
    assert_user_error(code, err, "TLS verification failed")
    doc = pull_json(capsys, url, "--cache-dir", str(tmp_path), "--ca-bundle", str(ca))
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()
