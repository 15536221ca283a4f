"""For the Wasm fetcher tests (tests/wasm/fetch): fixture data types, test modules, running the CLI in-process."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main

USER, PASSWORD = "alice", "wonderland-7"
READER, READER_PASSWORD = "bob", "pull-only-3"


def make_module(payload_size: int = 64, seed: str = "x") -> bytes:
    """A valid Wasm binary: header plus one custom section of pseudo-random bytes."""
    payload = bytearray()
    counter = 0
    while len(payload) < payload_size:
        payload += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    name = b"fixture"
    body = bytes([len(name)]) + name + bytes(payload[:payload_size])
    size, leb = len(body), bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        leb.append(byte | (0x80 if size else 0))
        if not size:
            break
    return b"\0asm\x01\x00\x00\x00" + b"\x00" + bytes(leb) + body


@dataclass
class Registry:
    host: str  # 127.0.0.1:port
    process: subprocess.Popen[bytes]
    auth: str  # "basic" or "token"
    log_path: Path
    token_requests: list[dict[str, str]] = field(default_factory=list)
    token_host: str | None = None  # the token realm's host:port (plain HTTP, so it must be marked insecure)

    def blob_gets(self, repository: str, digest: str) -> int:
        """Successful GETs of a blob, from the registry's access log."""
        needle = f'"GET /v2/{repository}/blobs/{digest} HTTP/1.1" 200'
        return self.log_path.read_text(errors="replace").count(needle)

    @property
    def insecure_hosts(self) -> frozenset[str]:
        return frozenset(h for h in (self.host, self.token_host) if h is not None)

    def cli_args(self) -> list[str]:
        return [arg for host in sorted(self.insecure_hosts) for arg in ("--insecure-registry", host)]

    def config_json(self, path: Path, user: str = USER, password: str = PASSWORD) -> Path:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        path.write_text(json.dumps({"auths": {f"http://{self.host}": {"auth": auth}}}))
        return path

    def secret_manifest(self, path: Path, user: str = USER, password: str = PASSWORD) -> Path:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        config = json.dumps({"auths": {self.host: {"auth": auth}}})
        data = base64.b64encode(config.encode()).decode()
        path.write_text(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: pull, namespace: default}\n"
            f"type: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: {data}\n"
        )
        return path


@dataclass(frozen=True)
class Answer:
    """One scripted answer. `drip`: seconds between single bytes of the body (a trickling server);
    `repeat`: the body is sent this many times over (a huge reply without a huge test constant);
    `declare_length`: send a Content-Length of the true length (else none: the body ends at close)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    drip: float | None = None
    repeat: int = 1
    declare_length: bool = True
    hold: float = 0.0  # seconds to keep the connection open after the body (a peer that stalls)


Route = tuple[int, dict[str, str], bytes] | Answer


@dataclass
class ScriptedServer:
    """An HTTP server on 127.0.0.1 answering GET from a path -> [answer, ...] table: the n-th request
    to a path gets the n-th answer (the last one repeats); `hits` counts them and `seen` keeps each
    request's path and headers (to check what a client sent where)."""

    port: int
    routes: dict[str, list[Route]]
    hits: dict[str, int]
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    ca: Path | None = None  # set when it serves HTTPS: the CA bundle that trusts it

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{'https' if self.ca else 'http'}://{self.host}{path}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def pull_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "wasm", "pull", "--json", *argv)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, one line on stderr, no traceback, mentioning each needle."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sidecar: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def cache_files(cache: Path) -> list[str]:
    """Everything under modules/ and tmp/: a failed pull must leave both empty."""
    found = []
    for sub in ("modules", "tmp"):
        directory = cache / sub
        if directory.exists():
            found += [f"{sub}/{p.name}" for p in directory.iterdir()]
    return sorted(found)


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def serve_image(
    server: ScriptedServer,
    repo: str,
    layer: bytes,
    *,
    media_type: str = WASM_LAYER,
    declared_size: int | None = None,
    declared_digest: str | None = None,
    served_layer: bytes | None = None,
    manifest_extra: dict[str, Any] | None = None,
    manifest_headers: dict[str, str] | None = None,
    blob_answer: Route | None = None,
) -> str:
    """Publish a one-layer image under tag `v1` on the scripted server; the descriptor and the served
    blob may disagree, and `blob_answer` replaces the blob's answer (a redirect, a trickle...)."""
    config = b"{}"
    digest = declared_digest or digest_of(layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.module.wasm.config.v1+json", "digest": digest_of(config), "size": 2},
        "layers": [{"mediaType": media_type, "digest": digest, "size": declared_size or len(layer)}],
        **(manifest_extra or {}),
    }
    body = json.dumps(manifest).encode()
    headers = {"Content-Type": OCI_MANIFEST, **(manifest_headers or {})}
    server.routes[f"/v2/{repo}/manifests/v1"] = [(200, headers, body)]
    server.routes[f"/v2/{repo}/manifests/{digest_of(body)}"] = [(200, headers, body)]
    blob = blob_answer or (200, {}, served_layer if served_layer is not None else layer)
    server.routes[f"/v2/{repo}/blobs/{digest}"] = [blob]
    return digest_of(body)
