"""Lying and broken registries and URLs, served by a scripted HTTP server on 127.0.0.1 that speaks
just enough of the distribution API. Each case: exit 2, one line, nothing left in the cache."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.support.wasm_fetch import (
    ScriptedServer,
    assert_user_error,
    cache_files,
    digest_of,
    make_module,
    pull_json,
    run,
    serve_image,
)


def _pull(
    capsys: pytest.CaptureFixture[str], server: ScriptedServer, ref: str, cache: Path, *extra: str
) -> tuple[int, str]:
    code, _, err = run(
        capsys, "wasm", "pull", ref, "--cache-dir", str(cache), "--insecure-registry", server.host, *extra
    )
    return code, err


def test_scripted_registry_serves_a_good_image(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(1000)
    serve_image(scripted_server, "ok/mod", module)
    doc = pull_json(
        capsys,
        f"{scripted_server.host}/ok/mod:v1",
        "--cache-dir",
        str(tmp_path),
        "--insecure-registry",
        scripted_server.host,
    )
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()


def test_layer_larger_than_its_descriptor(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(1000)
    serve_image(scripted_server, "lie/size", module[:500], served_layer=module, declared_digest=digest_of(module[:500]))
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/lie/size:v1", tmp_path)
    assert_user_error(code, err, "500 bytes its descriptor declares")
    assert cache_files(tmp_path) == []


def test_layer_shorter_than_its_descriptor(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(1000)
    serve_image(scripted_server, "lie/short", module, declared_size=len(module) + 100)
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/lie/short:v1", tmp_path)
    assert_user_error(code, err, "the descriptor says")
    assert cache_files(tmp_path) == []


def test_layer_with_wrongdigest_of(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(1000)
    evil = make_module(1000, seed="evil")
    serve_image(scripted_server, "lie/digest", module, served_layer=evil)
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/lie/digest:v1", tmp_path)
    assert_user_error(code, err, "content has", digest_of(module))
    assert cache_files(tmp_path) == []


def test_manifest_with_wrong_docker_contentdigest_of(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_image(
        scripted_server,
        "lie/manifest",
        make_module(100),
        manifest_headers={"Docker-Content-Digest": digest_of(b"other")},
    )
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/lie/manifest:v1", tmp_path)
    assert_user_error(code, err, "Docker-Content-Digest")


def test_manifest_fetched_by_digest_must_hash_to_it(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_image(scripted_server, "lie/bydigest", make_module(100))
    wrong = digest_of(b"something else")
    scripted_server.routes[f"/v2/lie/bydigest/manifests/{wrong}"] = scripted_server.routes[
        "/v2/lie/bydigest/manifests/v1"
    ]
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/lie/bydigest@{wrong}", tmp_path)
    assert_user_error(code, err, "not the digest that was asked for")


def test_oversized_manifest_is_refused(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    padding = {"annotations": {"pad": "x" * (5 << 20)}}
    serve_image(scripted_server, "big/manifest", make_module(100), manifest_extra=padding)
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/big/manifest:v1", tmp_path)
    assert_user_error(code, err, "cap")


def test_not_a_wasm_blob(scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serve_image(scripted_server, "bad/magic", b"#!/bin/sh\necho hello\n")
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/bad/magic:v1", tmp_path)
    assert_user_error(code, err, "not a WebAssembly module")
    assert cache_files(tmp_path) == []


def test_oversize_module(scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serve_image(scripted_server, "big/module", make_module(20_000))
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/big/module:v1", tmp_path, "--max-size", "10000")
    assert_user_error(code, err, "cap is 10000")
    assert cache_files(tmp_path) == []


def test_compat_layer_bomb_is_capped(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small tar+gzip whose plugin.wasm inflates past the cap: stopped at the cap, nothing kept."""
    raw = io.BytesIO()
    big = b"\0asm\x01\x00\x00\x00" + bytes(3 << 20)
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(big)
        tar.addfile(info, io.BytesIO(big))
    layer = gzip.compress(raw.getvalue())
    assert len(layer) < 100_000
    serve_image(scripted_server, "bomb/compat", layer, media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    code, err = _pull(
        capsys, scripted_server, f"{scripted_server.host}/bomb/compat:v1", tmp_path, "--max-size", "1000000"
    )
    assert_user_error(code, err, "plugin.wasm is more than the cap")
    assert cache_files(tmp_path) == []


def test_compat_layer_without_plugin_wasm(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("../../etc/evil.wasm")
        data = make_module(10)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    serve_image(
        scripted_server,
        "bad/compat",
        gzip.compress(raw.getvalue()),
        media_type="application/vnd.docker.image.rootfs.diff.tar.gzip",
    )
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/bad/compat:v1", tmp_path)
    assert_user_error(code, err, "holds no plugin.wasm")
    assert not (tmp_path.parent / "etc").exists()
    assert cache_files(tmp_path) == []


def test_unsupported_media_type(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_image(scripted_server, "bad/type", make_module(10), media_type="application/vnd.oci.image.layer.v1.tar")
    code, err = _pull(capsys, scripted_server, f"{scripted_server.host}/bad/type:v1", tmp_path)
    assert_user_error(code, err, "application/vnd.oci.image.layer.v1.tar")


def test_a_loopback_registry_may_speak_plain_http_unlisted_as_with_docker(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(10)
    serve_image(scripted_server, "ok/plain", module)
    ref = f"{scripted_server.host}/ok/plain:v1"
    doc = pull_json(capsys, ref, "--cache-dir", str(tmp_path / "a"), "--timeout", "3")
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()
    # The same registry named as localhost: loopback too.
    doc = pull_json(capsys, f"localhost:{scripted_server.port}/ok/plain:v1", "--cache-dir", str(tmp_path / "b"))
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()
    # With the rule off (library callers may), the TLS failure is the error, and it says what to do.
    from sidecar.wasm.fetch.cache import ModuleCache
    from sidecar.wasm.fetch.errors import FetchError
    from sidecar.wasm.fetch.fetcher import ModuleFetcher
    from sidecar.wasm.fetch.transfer import FetchOptions

    strict = ModuleFetcher(ModuleCache(tmp_path / "c"), FetchOptions(loopback_plain_http=False, request_timeout=3))
    with pytest.raises(FetchError, match=r"TLS handshake with .* failed .*--insecure-registry"):
        strict.pull_image(ref)


def test_the_loopback_rule_does_not_extend_to_redirects(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unlisted loopback registry may hand us only to itself or to HTTPS, never to another plain host."""
    module = make_module(10)
    other = "http://localhost:1/blob"  # loopback as well, but not the registry the pull named
    serve_image(scripted_server, "hop/plain", module, blob_answer=(307, {"Location": other}, b""))
    code, _, err = run(capsys, "wasm", "pull", f"{scripted_server.host}/hop/plain:v1", "--cache-dir", str(tmp_path))
    assert_user_error(code, err, "refusing to fetch", other)
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize(
    ("ref", "needle"),
    [("Bad/Upper:1", "bad repository"), ("host:5000/repo@sha256:abc", "64 lower-case hex"), ("", "expected")],
)
def test_malformed_reference(ref: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "wasm", "pull", ref, "--cache-dir", str(tmp_path))
    assert_user_error(code, err, needle)


def test_malformed_pull_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("apiVersion: v1\nkind: Secret\ntype: Opaque\ndata: {}\n")
    code, _, err = run(
        capsys, "wasm", "pull", "127.0.0.1:1/x:1", "--cache-dir", str(tmp_path), "--pull-secret", str(secret)
    )
    assert_user_error(code, err, str(secret), "kubernetes.io/dockerconfigjson")


# --- HTTP sources ---


def test_http_pull_with_sha256(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(2000, seed="http")
    scripted_server.routes["/m.wasm"] = [(200, {}, module)]
    sha = hashlib.sha256(module).hexdigest()
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host, "--sha256", sha)
    doc = pull_json(capsys, scripted_server.url("/m.wasm"), *args)
    assert doc["sha256"] == sha and Path(doc["path"]).read_bytes() == module
    again = pull_json(capsys, scripted_server.url("/m.wasm"), *args)
    assert again["cache_hit"] is True
    assert scripted_server.hits["/m.wasm"] == 1


def test_http_sha256_mismatch(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted_server.routes["/m.wasm"] = [(200, {}, make_module(100))]
    wrong = hashlib.sha256(b"other").hexdigest()
    code, err = _pull(capsys, scripted_server, scripted_server.url("/m.wasm"), tmp_path, "--sha256", wrong)
    assert_user_error(code, err, "body has sha256", wrong)
    assert cache_files(tmp_path) == []


def test_http_retries_only_retryable_errors(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(100, seed="retry")
    scripted_server.routes["/flaky.wasm"] = [(503, {}, b"busy"), (502, {}, b"busy"), (200, {}, module)]
    doc = pull_json(
        capsys,
        scripted_server.url("/flaky.wasm"),
        "--cache-dir",
        str(tmp_path),
        "--insecure-registry",
        scripted_server.host,
    )
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()
    assert scripted_server.hits["/flaky.wasm"] == 3
    scripted_server.routes["/gone.wasm"] = [(404, {}, b"")]
    code, err = _pull(capsys, scripted_server, scripted_server.url("/gone.wasm"), tmp_path)
    assert_user_error(code, err, "not found")
    assert scripted_server.hits["/gone.wasm"] == 1


def test_http_truncated_body(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(1000)
    scripted_server.routes["/short.wasm"] = [(200, {"Content-Length": str(len(module) + 50)}, module)]
    code, err = _pull(capsys, scripted_server, scripted_server.url("/short.wasm"), tmp_path, "--retries", "1")
    assert_user_error(code, err, "connection failed")
    assert scripted_server.hits["/short.wasm"] == 2  # a broken connection is worth one retry
    assert cache_files(tmp_path) == []


def test_http_oversize_and_not_wasm(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted_server.routes["/big.wasm"] = [(200, {}, make_module(5000))]
    code, err = _pull(capsys, scripted_server, scripted_server.url("/big.wasm"), tmp_path, "--max-size", "4096")
    assert_user_error(code, err, "cap of 4096")
    scripted_server.routes["/page.html"] = [(200, {}, b"<html>login</html>")]
    code, err = _pull(capsys, scripted_server, scripted_server.url("/page.html"), tmp_path)
    assert_user_error(code, err, "not a WebAssembly module")
    assert cache_files(tmp_path) == []


def test_plain_http_urls_need_listing_unless_loopback(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "wasm", "pull", "http://modules.example.invalid/m.wasm", "--cache-dir", str(tmp_path))
    assert_user_error(code, err, "plain http")  # refused before any lookup or connection
    module = make_module(100, seed="loopback-url")
    scripted_server.routes["/m.wasm"] = [(200, {}, module)]
    doc = pull_json(capsys, scripted_server.url("/m.wasm"), "--cache-dir", str(tmp_path))
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()
    scripted_server.routes["/away.wasm"] = [(302, {"Location": "http://localhost:1/m.wasm"}, b"")]
    code, _, err = run(capsys, "wasm", "pull", scripted_server.url("/away.wasm"), "--cache-dir", str(tmp_path))
    assert_user_error(code, err, "refusing to fetch", "http://localhost:1/m.wasm")


def test_signed_url_query_never_shown(
    scripted_server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(100, seed="signed")
    scripted_server.routes["/signed.wasm"] = [(200, {}, module)]
    url = scripted_server.url("/signed.wasm?X-Amz-Signature=topsecret123")
    code, err = _pull(capsys, scripted_server, url, tmp_path, "--sha256", "0" * 64)
    assert_user_error(code, err, "/signed.wasm")
    assert "topsecret123" not in err
    pull_json(capsys, url, "--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host)
    code, out, _ = run(capsys, "wasm", "ls", "--json", "--cache-dir", str(tmp_path))
    assert code == 0 and len(json.loads(out)) == 2  # url#sha256 and url
    assert "topsecret123" not in out and "topsecret123" not in (tmp_path / "index.json").read_text()
