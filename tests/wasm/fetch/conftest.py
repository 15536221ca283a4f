"""Real components for the fetcher tests: Debian's `docker-registry` (CNCF Distribution 2.8) on
127.0.0.1 with htpasswd basic auth or bearer-token auth (tokens from an issuer in this process,
signed RS256 by `openssl` with a key the registry trusts), and a small scriptable HTTP server."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.wait import wait_for
from tests.support.wasm_fetch import (
    PASSWORD,
    READER,
    READER_PASSWORD,
    USER,
    Answer,
    Registry,
    Route,
    ScriptedServer,
)

_START_DEADLINE = 15.0
_DRIP_LIMIT = 30.0


def _start_registry(directory: Path, auth_yaml: str, auth: str) -> Iterator[Registry]:
    port = free_port()
    (directory / "data").mkdir()
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: error, accesslog: {disabled: false}}\n"
        f"storage: {{filesystem: {{rootdirectory: {directory / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}', secret: test-secret}}\n"
        f"auth:\n{auth_yaml}"
    )
    log = open(directory / "registry.log", "wb")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:

        def answering() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):
                    return True
            except urllib.error.HTTPError as exc:
                exc.close()
                return exc.code == 401
            except OSError:
                assert process.poll() is None, (directory / "registry.log").read_text()
                return False

        wait_for(answering, _START_DEADLINE, "docker-registry to listen")
        yield Registry(f"127.0.0.1:{port}", process, auth, log_path=directory / "registry.log")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if shutil.which("docker-registry") is None or shutil.which("htpasswd") is None:
        pytest.fail("docker-registry and htpasswd are needed: apt-get install docker-registry apache2-utils")
    directory = tmp_path_factory.mktemp("registry-basic")
    htpasswd = directory / "htpasswd"
    lines = []
    for user, password in ((USER, PASSWORD), (READER, READER_PASSWORD)):
        out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, timeout=30)
        lines.append(out.stdout.decode().strip())
    htpasswd.write_text("\n".join(lines) + "\n")
    yield from _start_registry(directory, f"  htpasswd: {{realm: test, path: {htpasswd}}}\n", "basic")


class _TokenIssuer:
    """The Docker token endpoint: Basic credentials in, an RS256 JWT for the asked scope out.
    `bob` gets pull only, so a push with his credentials fails on scope, not on password."""

    def __init__(self, directory: Path, service: str, issuer: str) -> None:
        self.key = directory / "token.key"
        self.cert = directory / "token.crt"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
                "-days",
                "2",
                "-subj",
                "/CN=test-token-issuer",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        self.x5c = base64.b64encode(der).decode()
        self.service, self.issuer = service, issuer
        self.requests: list[dict[str, str]] = []

    def token(self, user: str, scope: str) -> str:
        access = []
        for item in scope.split(" ") if scope else []:
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            allowed = [a for a in wanted if a == "pull" or user == USER]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = b".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input,
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        return (signing_input + b"." + _b64url(signature)).decode()


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, int(server.server_address[1])


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    directory = tmp_path_factory.mktemp("registry-token")
    issuer = _TokenIssuer(directory, "test-registry", "test-issuer")
    users = {USER: PASSWORD, READER: READER_PASSWORD}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            issuer.requests.append(query)
            header = self.headers.get("Authorization", "")
            user = password = ""
            if header.startswith("Basic "):
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if users.get(user) != password or not user:
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            token = issuer.token(user, query.get("scope", ""))
            body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server, tport = _serve(Handler)
    auth_yaml = (
        f"  token: {{realm: 'http://127.0.0.1:{tport}/token', service: {issuer.service}, "
        f"issuer: {issuer.issuer}, rootcertbundle: {issuer.cert}}}\n"
    )
    try:
        for registry in _start_registry(directory, auth_yaml, "token"):
            registry.token_requests = issuer.requests
            registry.token_host = f"127.0.0.1:{tport}"
            yield registry
    finally:
        server.shutdown()
        server.server_close()


def _scripted(tls: tuple[Path, Path] | None) -> Iterator[ScriptedServer]:
    routes: dict[str, list[Route]] = {}
    hits: dict[str, int] = {}
    seen: list[tuple[str, dict[str, str]]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            hits[path] = hits.get(path, 0) + 1
            seen.append((self.path, dict(self.headers.items())))
            answers = routes.get(path, [(404, {}, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')])
            answer = answers[min(hits[path], len(answers)) - 1]
            if not isinstance(answer, Answer):
                answer = Answer(*answer)
            self.send_response(answer.status)
            for key, value in answer.headers.items():
                self.send_header(key, value)
            if "Content-Length" not in answer.headers and answer.declare_length:
                self.send_header("Content-Length", str(len(answer.body) * answer.repeat))
            self.send_header("Connection", "close")
            self.end_headers()
            with contextlib.suppress(OSError):
                self._send_body(answer)
                if answer.hold:
                    self.wfile.flush()
                    # The behaviour under test (a peer that stops sending), not synchronisation; the
                    # client's read timeout ends it first, and the read below returns when it closes.
                    self.connection.settimeout(answer.hold)
                    with contextlib.suppress(OSError):
                        self.connection.recv(1)
            self.close_connection = True

        def _send_body(self, answer: Answer) -> None:
            if answer.drip is None:
                for _ in range(answer.repeat):
                    self.wfile.write(answer.body)
                return
            stop = time.monotonic() + _DRIP_LIMIT  # a dripping answer stops by itself
            for byte in answer.body * answer.repeat:
                if time.monotonic() > stop:
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(answer.drip)  # the behaviour under test (a trickling peer), not synchronisation

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls[0], tls[1])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield ScriptedServer(int(server.server_address[1]), routes, hits, seen, tls[0] if tls else None)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def scripted_server() -> Iterator[ScriptedServer]:
    yield from _scripted(None)


@pytest.fixture(scope="session")
def loopback_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key); the cert is its own CA bundle."""
    directory = tmp_path_factory.mktemp("tls-scripted")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)),
            *("-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_scripted_server(loopback_cert: tuple[Path, Path]) -> Iterator[ScriptedServer]:
    """The scripted server over HTTPS; pass `--ca-bundle server.ca` to trust it."""
    yield from _scripted(loopback_cert)


@pytest.fixture
def own_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry of the test's own (htpasswd auth), for tests that stop it."""
    directory = tmp_path_factory.mktemp("registry-own")
    out = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, timeout=30)
    (directory / "htpasswd").write_text(out.stdout.decode())
    yield from _start_registry(directory, f"  htpasswd: {{realm: test, path: {directory / 'htpasswd'}}}\n", "basic")
