"""Peers that lie about transports, trickle, stall or answer the token request with junk: each ends in
one line and exit 2 within the deadline, sends no credentials where they do not belong, and caches
nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.wasm_fetch import (
    PASSWORD,
    USER,
    Answer,
    ScriptedServer,
    assert_user_error,
    cache_files,
    make_module,
    pull_json,
    run,
    serve_image,
)


def _pull(capsys: pytest.CaptureFixture[str], ref: str, cache: Path, *extra: str) -> tuple[int, str]:
    code, _, err = run(capsys, "wasm", "pull", ref, "--cache-dir", str(cache), *extra)
    return code, err


# --- no downgrade from HTTPS to plain HTTP ---


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_https_url_redirect_to_http_is_refused(
    status: int,
    tls_scripted_server: ScriptedServer,
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = make_module(300, seed="downgrade")
    scripted_server.routes["/m.wasm"] = [(200, {}, module)]
    tls_scripted_server.routes["/m.wasm"] = [(status, {"Location": scripted_server.url("/m.wasm")}, b"")]
    ca = ("--ca-bundle", str(tls_scripted_server.ca))
    code, err = _pull(capsys, tls_scripted_server.url("/m.wasm"), tmp_path, *ca, "--retries", "0")
    assert_user_error(code, err, "refusing to fetch", scripted_server.url("/m.wasm"), "plain http")
    assert scripted_server.hits == {}  # not a single cleartext request
    assert cache_files(tmp_path) == []
    # The user may allow it for that host, explicitly.
    doc = pull_json(
        capsys,
        tls_scripted_server.url("/m.wasm"),
        "--cache-dir",
        str(tmp_path),
        *ca,
        "--insecure-registry",
        scripted_server.host,
    )
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()


def test_redirect_chains_are_checked_at_every_hop(
    tls_scripted_server: ScriptedServer,
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tls = tls_scripted_server
    ca = ("--ca-bundle", str(tls.ca), "--retries", "0")
    # https -> https -> http: the last hop is the downgrade.
    tls.routes["/a.wasm"] = [(302, {"Location": "/b.wasm"}, b"")]
    tls.routes["/b.wasm"] = [(307, {"Location": scripted_server.url("/c.wasm")}, b"")]
    code, err = _pull(capsys, tls.url("/a.wasm"), tmp_path, *ca)
    assert_user_error(code, err, "refusing to fetch", "/c.wasm")
    # Other schemes are never followed.
    for target in ("file:///etc/passwd", "ftp://127.0.0.1/m.wasm", "gopher://127.0.0.1/"):
        tls.routes["/other.wasm"] = [(302, {"Location": target}, b"")]
        code, err = _pull(capsys, tls.url("/other.wasm"), tmp_path, *ca)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    # A loop ends after a few hops.
    tls.routes["/loop.wasm"] = [(302, {"Location": "/loop.wasm"}, b"")]
    code, err = _pull(capsys, tls.url("/loop.wasm"), tmp_path, *ca)
    assert_user_error(code, err, "TooManyRedirects")
    assert tls.hits["/loop.wasm"] <= 6
    # An insecure-marked plain-HTTP host may not hand us to another plain-HTTP host.
    scripted_server.routes["/x.wasm"] = [(302, {"Location": "http://localhost:1/x.wasm"}, b"")]
    code, err = _pull(capsys, scripted_server.url("/x.wasm"), tmp_path, "--insecure-registry", scripted_server.host)
    assert_user_error(code, err, "refusing to fetch", "http://localhost:1/x.wasm")
    assert cache_files(tmp_path) == []


def test_https_registry_blob_redirect_to_http_is_refused(
    tls_scripted_server: ScriptedServer,
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = make_module(500, seed="blob-downgrade")
    digest = "sha256:" + hashlib.sha256(module).hexdigest()
    scripted_server.routes["/storage/blob"] = [(200, {}, module)]
    redirect = (307, {"Location": scripted_server.url("/storage/blob")}, b"")
    serve_image(tls_scripted_server, "team/mod", module, blob_answer=redirect)
    ref = f"{tls_scripted_server.host}/team/mod:v1"
    code, err = _pull(capsys, ref, tmp_path, "--ca-bundle", str(tls_scripted_server.ca))
    assert_user_error(code, err, "refusing to fetch", scripted_server.url("/storage/blob"))
    assert scripted_server.hits == {}
    assert cache_files(tmp_path) == []
    # To another HTTPS host (object storage): followed, and the registry's Authorization stays behind.
    tls_scripted_server.routes["/storage/blob"] = [(200, {}, module)]
    tls_scripted_server.routes[f"/v2/team/mod/blobs/{digest}"] = [(307, {"Location": "/storage/blob"}, b"")]
    doc = pull_json(capsys, ref, "--cache-dir", str(tmp_path), "--ca-bundle", str(tls_scripted_server.ca))
    assert doc["sha256"] == digest.removeprefix("sha256:")


def test_blob_redirect_to_another_host_drops_the_registry_token(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The registry's bearer token is for the registry: a redirect to another origin must not carry it."""
    module = make_module(400, seed="strip-auth")
    token = "registry-token-" + "q" * 20
    srv = scripted_server
    challenge = f'Bearer realm="http://{srv.host}/token",service="reg",scope="repository:team/mod:pull"'
    digest = "sha256:" + hashlib.sha256(module).hexdigest()
    other = f"http://localhost:{srv.port}/storage/blob"  # another origin (another host name), same server
    serve_image(srv, "team/mod", module, blob_answer=(307, {"Location": other}, b""))
    manifest_route = srv.routes["/v2/team/mod/manifests/v1"]
    srv.routes["/v2/team/mod/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b""), *manifest_route]
    srv.routes["/token"] = [(200, {}, json.dumps({"token": token}).encode())]
    srv.routes["/storage/blob"] = [(200, {}, module)]
    insecure = ("--insecure-registry", srv.host, "--insecure-registry", f"localhost:{srv.port}")
    doc = pull_json(capsys, f"{srv.host}/team/mod:v1", "--cache-dir", str(tmp_path), *insecure)
    assert doc["sha256"] == digest.removeprefix("sha256:")
    sent = {path: headers.get("Authorization") for path, headers in srv.seen}
    assert sent[f"/v2/team/mod/blobs/{digest}"] == f"Bearer {token}"
    assert sent["/storage/blob"] is None


# --- one deadline over every phase ---


@pytest.mark.parametrize("phase", ["blob", "manifest", "token", "url", "error-body"])
def test_a_trickle_cannot_outlive_the_deadline(
    phase: str, scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 byte every 0.5 s never trips a 2 s read timeout; the 3 s deadline must still end it."""
    srv = scripted_server
    module = make_module(2000, seed=f"trickle-{phase}")
    drip = Answer(200, {}, module, drip=0.5)
    ref = f"{srv.host}/slow/mod:v1"
    if phase == "blob":
        serve_image(srv, "slow/mod", module, blob_answer=drip)
    elif phase == "manifest":
        serve_image(srv, "slow/mod", module)
        srv.routes["/v2/slow/mod/manifests/v1"] = [Answer(200, {}, b"{" + b" " * 2000 + b"}", drip=0.5)]
    elif phase == "token":
        serve_image(srv, "slow/mod", module)
        challenge = f'Bearer realm="http://{srv.host}/token",service="reg"'
        srv.routes["/v2/slow/mod/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b"")]
        srv.routes["/token"] = [Answer(200, {}, json.dumps({"token": "t" * 2000}).encode(), drip=0.5)]
    elif phase == "error-body":
        srv.routes["/v2/slow/mod/manifests/v1"] = [Answer(404, {}, b"x" * 2000, drip=0.5)]
    else:
        srv.routes["/m.wasm"] = [drip]
        ref = srv.url("/m.wasm")
    start = time.monotonic()
    code, err = _pull(capsys, ref, tmp_path, "--insecure-registry", srv.host, "--timeout", "2", "--deadline", "3")
    elapsed = time.monotonic() - start
    assert elapsed < 6, elapsed  # ~3.1 s measured; generous for a loaded machine
    if phase == "error-body":
        assert_user_error(code, err, "not found")  # the status is known; the unread error body is dropped
    else:
        assert_user_error(code, err, "overall deadline of 3 s", "bytes received")
    assert cache_files(tmp_path) == []


def test_dripping_status_line_and_headers_are_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A peer that sends its response headers one byte at a time, forever."""
    with _header_dripper() as host:
        start = time.monotonic()
        code, err = _pull(
            capsys, f"http://{host}/m.wasm", tmp_path, "--insecure-registry", host, "--timeout", "2", "--deadline", "2"
        )
        assert time.monotonic() - start < 5
    assert_user_error(code, err, "overall deadline of 2 s")


class _header_dripper:
    """A raw socket server: `HTTP/1.1 200 OK`, then a header line that never ends, 1 byte / 0.3 s."""

    def __enter__(self) -> str:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return f"127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self._stop.wait(0.3):  # the behaviour under test; ends when the test does
                try:
                    conn.sendall(b"a")
                except OSError:
                    return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)


def test_read_timeout_mid_body_reports_the_bytes_received(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(5000, seed="stall")
    stall = Answer(200, {"Content-Length": str(len(module))}, module[:500], hold=10)
    scripted_server.routes["/m.wasm"] = [stall]
    serve_image(scripted_server, "stall/mod", module, blob_answer=stall)
    args = ("--insecure-registry", scripted_server.host, "--timeout", "1", "--retries", "0")
    code, err = _pull(capsys, scripted_server.url("/m.wasm"), tmp_path, *args)
    assert_user_error(code, err, "after 500 bytes", "read timed out")
    code, err = _pull(capsys, f"{scripted_server.host}/stall/mod:v1", tmp_path, *args)
    assert_user_error(code, err, "after 500 bytes", "read timed out")
    assert cache_files(tmp_path) == []


# --- the token endpoint ---


def _token_route(srv: ScriptedServer, repo: str, answer: Answer | tuple[int, dict[str, str], bytes], realm: str) -> str:
    module = make_module(300, seed=f"token-{repo}")
    serve_image(srv, repo, module)
    challenge = f'Bearer realm="{realm}",service="reg",scope="repository:{repo}:pull"'
    manifest = srv.routes[f"/v2/{repo}/manifests/v1"]
    srv.routes[f"/v2/{repo}/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b""), *manifest]
    srv.routes["/token"] = [answer]
    return f"{srv.host}/{repo}:v1"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'["a", "list"]', "not an object"),
        (b"<html>sign in</html>", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b"{}", "no usable token"),
        (b'{"token": 12345}', "no usable token"),
        (b'{"token": ""}', "no usable token"),
        (b'{"token": "abc\\r\\nX-Injected: 1"}', "no usable token"),
        (b'{"token": {"nested": "x"}}', "no usable token"),
        ('{"token": "caf\u00e9"}'.encode(), "no usable token"),
    ],
)
def test_token_reply_that_is_not_a_token(
    body: bytes, needle: str, scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = _token_route(scripted_server, "tok/junk", (200, {}, body), f"http://{scripted_server.host}/token")
    code, err = _pull(capsys, ref, tmp_path, "--insecure-registry", scripted_server.host)
    assert_user_error(code, err, "token endpoint", needle)
    assert "cannot reach" not in err
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("declared", [True, False])
def test_huge_token_reply_is_refused_at_the_cap(
    declared: bool, scripted_server: ScriptedServer, tmp_path: Path
) -> None:
    """200 MiB of token reply, with and without a Content-Length: refused at the 256 KiB cap."""
    chunk = b'{"token": "' + b"a" * ((1 << 20) - 11)
    answer = Answer(200, {}, chunk, repeat=200, declare_length=declared)
    ref = _token_route(scripted_server, "tok/huge", answer, f"http://{scripted_server.host}/token")
    cmd = [sys.executable, "-m", "sidecar", "wasm", "pull", ref, "--cache-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [*cmd, "--insecure-registry", scripted_server.host, "--deadline", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert b"cap of 262144" in err and b"token endpoint" in err
    assert err.decode().count("\n") == 1


def test_huge_token_reply_rss(scripted_server: ScriptedServer, tmp_path: Path) -> None:
    """The peak RSS of a pull refused a 200 MiB token reply.

    Read from the child's own VmHWM: the memory it mapped after exec. (`wait4`'s ru_maxrss is no use
    here: a process started with vfork+exec inherits its parent's peak, and the test runner is large.)"""
    chunk = b'{"token": "' + b"a" * ((1 << 20) - 11)
    ref = _token_route(
        scripted_server,
        "tok/rss",
        Answer(200, {}, chunk, repeat=200, declare_length=False),
        f"http://{scripted_server.host}/token",
    )
    probe = (
        "import sys\n"
        "from sidecar.cli import main\n"
        "try:\n"
        "    code = main(sys.argv[1:])\n"
        "finally:\n"
        "    peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "    print(peak.split()[1], file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    args = ["wasm", "pull", ref, "--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host]
    proc = subprocess.run(
        [sys.executable, "-c", probe, *args, "--deadline", "60"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    assert 10 << 10 < peak_kib < 120 << 10, peak_kib  # ~48 MiB measured, 846 MiB before the cap


@pytest.mark.parametrize(
    ("realm", "marked"),
    [
        ("http://127.0.0.1:{other}/token", "127.0.0.1:{port}"),  # same IP, another port
        ("http://localhost:{port}/token", "127.0.0.1:{port}"),  # same port, another host name
        ("http://127.0.0.1:{other}/token", "localhost"),  # a host marked that is not the realm's
    ],
)
def test_basic_credentials_never_go_to_an_untrusted_realm(
    realm: str,
    marked: str,
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as other_sock:
        other_sock.bind(("127.0.0.1", 0))
        other_sock.listen(1)
        other = other_sock.getsockname()[1]
        realm_url = realm.format(port=scripted_server.port, other=other)
        ref = _token_route(scripted_server, "tok/realm", (200, {}, b'{"token": "t"}'), realm_url)
        insecure = marked.format(port=scripted_server.port)
        monkeypatch.setenv("SIDECAR_REGISTRY_USERNAME", USER)
        monkeypatch.setenv("SIDECAR_REGISTRY_PASSWORD", PASSWORD)
        code, err = _pull(
            capsys, ref, tmp_path, "--insecure-registry", insecure, "--insecure-registry", scripted_server.host
        )
        assert_user_error(code, err, "refusing to ask token realm", realm_url)
        other_sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            other_sock.accept()  # nobody connected: the credentials never left
    assert PASSWORD not in err
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert all(headers.get("Authorization") != f"Basic {basic}" for _, headers in scripted_server.seen)


def test_https_registry_may_not_name_a_plain_http_realm(
    tls_scripted_server: ScriptedServer,
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    realm = scripted_server.url("/token")
    ref = _token_route(tls_scripted_server, "tok/down", (200, {}, b'{"token": "t"}'), realm)
    code, err = _pull(capsys, ref, tmp_path, "--ca-bundle", str(tls_scripted_server.ca))
    assert_user_error(code, err, "refusing to ask token realm")
    assert scripted_server.hits == {}
