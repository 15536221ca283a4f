"""Push and pull against a real Distribution 2.8 registry: all layouts, tag and digest, every auth kind."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from tests.support.wasm_fetch import (
    PASSWORD,
    READER,
    READER_PASSWORD,
    USER,
    Registry,
    assert_user_error,
    cache_files,
    make_module,
    pull_json,
    run,
)


@pytest.fixture(params=["basic", "token"])
def registry(request: pytest.FixtureRequest) -> Registry:
    reg: Registry = request.getfixturevalue(f"{request.param}_registry")
    return reg


def _push(capsys: pytest.CaptureFixture[str], reg: Registry, module: Path, ref: str, creds: Path, *extra: str) -> str:
    code, out, err = run(capsys, "wasm", "push", str(module), ref, "--pull-secret", str(creds), *reg.cli_args(), *extra)
    assert code == 0, err
    return out.strip()


@pytest.mark.parametrize("layout", ["oci", "compat", "docker"])
@pytest.mark.parametrize("index", [False, True])
def test_push_then_pull_by_tag_and_digest(
    registry: Registry, layout: str, index: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(5000, seed=f"{registry.auth}-{layout}-{index}")
    path = tmp_path / "plugin.wasm"
    path.write_bytes(module)
    creds = registry.config_json(tmp_path / "config.json")
    ref = f"{registry.host}/filters/{layout}{'-idx' if index else ''}:v1"
    pushed = _push(capsys, registry, path, ref, creds, "--layout", layout, *(["--index"] if index else []))
    assert pushed.startswith("sha256:")
    cache = tmp_path / "cache"

    by_tag = pull_json(capsys, ref, "--cache-dir", str(cache), "--pull-secret", str(creds), *registry.cli_args())
    assert by_tag["sha256"] == hashlib.sha256(module).hexdigest()
    assert Path(by_tag["path"]).read_bytes() == module
    assert Path(by_tag["path"]).name == f"{by_tag['sha256']}.wasm"
    assert stat.S_IMODE(Path(by_tag["path"]).stat().st_mode) == 0o644
    assert by_tag["layout"] == ("oci" if layout == "oci" else "compat")
    assert by_tag["cache_hit"] is False
    # The pushed digest is the index's when there is one; the manifest digest otherwise.
    assert (by_tag["digest"] == pushed) is (not index)

    other_cache = tmp_path / "cache2"
    digest_ref = f"{registry.host}/filters/{layout}{'-idx' if index else ''}@{pushed}"
    by_digest = pull_json(
        capsys, digest_ref, "--cache-dir", str(other_cache), "--pull-secret", str(creds), *registry.cli_args()
    )
    assert by_digest["sha256"] == by_tag["sha256"]
    again = pull_json(capsys, digest_ref, "--cache-dir", str(other_cache), *registry.cli_args())
    assert again["cache_hit"] is True  # no credentials given: a network call would have been refused


def test_pull_with_kubernetes_secret_and_with_env(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = make_module(300, seed=f"secret-{registry.auth}")
    path = tmp_path / "m.wasm"
    path.write_bytes(module)
    ref = f"oci://{registry.host}/team/secret-filter:1.0"
    _push(capsys, registry, path, ref, registry.config_json(tmp_path / "config.json"))
    secret = registry.secret_manifest(tmp_path / "secret.yaml", READER, READER_PASSWORD)
    doc = pull_json(
        capsys, ref, "--cache-dir", str(tmp_path / "c1"), "--pull-secret", str(secret), *registry.cli_args()
    )
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.docker/config.json there
    monkeypatch.setenv("SIDECAR_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("SIDECAR_REGISTRY_PASSWORD", PASSWORD)
    doc = pull_json(capsys, ref, "--cache-dir", str(tmp_path / "c2"), *registry.cli_args())
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()

    monkeypatch.delenv("SIDECAR_REGISTRY_USERNAME")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dockercfg"))
    (tmp_path / "dockercfg").mkdir()
    registry.config_json(tmp_path / "dockercfg" / "config.json")
    doc = pull_json(capsys, ref, "--cache-dir", str(tmp_path / "c3"), *registry.cli_args())
    assert doc["sha256"] == hashlib.sha256(module).hexdigest()


def test_wrong_password_fails_fast_without_leaking(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    path = tmp_path / "m.wasm"
    path.write_bytes(make_module(100, seed="pw"))
    ref = f"{registry.host}/team/pw-filter:1"
    _push(capsys, registry, path, ref, registry.config_json(tmp_path / "good.json"))
    bad = registry.config_json(tmp_path / "bad.json", USER, "not-the-password-42")
    cache = tmp_path / "cache"
    start = time.monotonic()
    code, _, err = run(
        capsys,
        "wasm",
        "pull",
        ref,
        "--cache-dir",
        str(cache),
        "--pull-secret",
        str(bad),
        *registry.cli_args(),
    )
    assert time.monotonic() - start < 5
    assert_user_error(code, err, "alice", str(bad))
    assert "not-the-password-42" not in err
    assert cache_files(cache) == []


def test_anonymous_pull_of_private_image_is_refused(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = run(
        capsys,
        "wasm",
        "pull",
        f"{registry.host}/team/x:1",
        "--cache-dir",
        str(tmp_path / "c"),
        *registry.cli_args(),
    )
    assert_user_error(code, err, registry.host)


def test_push_token_scope_upgrade_and_pull_only_user(
    token_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The registry challenges a push's first call for `pull`, then its upload for `push,pull`: the
    client must fetch a second token (oras-py keeps the first). A pull-only user is refused."""
    path = tmp_path / "m.wasm"
    path.write_bytes(make_module(100, seed="scope"))
    token_registry.token_requests.clear()
    _push(
        capsys,
        token_registry,
        path,
        f"{token_registry.host}/team/scoped:1",
        token_registry.config_json(tmp_path / "rw.json"),
    )
    # The registry lists actions in no fixed order ("pull,push" or "push,pull").
    asked = [set(q.get("scope", "").rpartition(":")[2].split(",")) for q in token_registry.token_requests]
    assert {"pull"} in asked and {"pull", "push"} in asked, asked
    creds = token_registry.config_json(tmp_path / "ro.json", READER, READER_PASSWORD)
    code, _, err = run(
        capsys,
        "wasm",
        "push",
        str(path),
        f"{token_registry.host}/team/ro:1",
        "--pull-secret",
        str(creds),
        *token_registry.cli_args(),
    )
    assert_user_error(code, err, "bob", "not authorized")


@pytest.mark.parametrize("suffix", ["nothing-here/at-all:1", "team/tagless:nope"])
def test_unknown_repository_or_tag(
    registry: Registry, suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = registry.config_json(tmp_path / "config.json")
    path = tmp_path / "m.wasm"
    path.write_bytes(make_module(100, seed="tagless"))
    _push(capsys, registry, path, f"{registry.host}/team/tagless:exists", creds)
    cache = tmp_path / "cache"
    code, _, err = run(
        capsys,
        "wasm",
        "pull",
        f"{registry.host}/{suffix}",
        "--cache-dir",
        str(cache),
        "--pull-secret",
        str(creds),
        *registry.cli_args(),
    )
    assert_user_error(code, err, "not found")
    assert cache_files(cache) == []


def test_image_sha256_must_be_the_manifest_digest(
    basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(400, seed="pin")
    path = tmp_path / "m.wasm"
    path.write_bytes(module)
    creds = basic_registry.config_json(tmp_path / "config.json")
    ref = f"{basic_registry.host}/team/pinned:2"
    digest = _push(capsys, basic_registry, path, ref, creds)
    cache = tmp_path / "cache"
    args = ("--cache-dir", str(cache), "--pull-secret", str(creds), *basic_registry.cli_args())
    module_sha = hashlib.sha256(module).hexdigest()
    code, _, err = run(capsys, "wasm", "pull", ref, "--sha256", module_sha, *args)
    assert_user_error(code, err, "manifest digest", digest)
    assert cache_files(cache) == []
    doc = pull_json(capsys, ref, "--sha256", digest.removeprefix("sha256:"), *args)
    assert doc["sha256"] == module_sha and doc["digest"] == digest


def test_pull_writes_the_verified_module_where_envoy_reads_it(
    basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Helm chart's init container contract: `--output FILE` is Envoy's local.filename."""
    module = make_module(4000, seed="output")
    path = tmp_path / "plugin.wasm"
    path.write_bytes(module)
    creds = basic_registry.config_json(tmp_path / "config.json")
    ref = f"{basic_registry.host}/filters/output:v1"
    digest = _push(capsys, basic_registry, path, ref, creds)
    shared = tmp_path / "shared" / "wasm" / "filter.wasm"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"old module")
    pulled = pull_json(
        capsys,
        ref,
        "--sha256",
        digest,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(shared),
        "--pull-secret",
        str(creds),
        *basic_registry.cli_args(),
    )
    assert shared.read_bytes() == module
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert pulled["sha256"] == hashlib.sha256(module).hexdigest()
    assert sorted(p.name for p in shared.parent.iterdir()) == ["filter.wasm"]  # no temporary files left

    code, _, err = run(
        capsys,
        "wasm",
        "pull",
        ref,
        "--sha256",
        "0" * 64,
        "--cache-dir",
        str(tmp_path / "c2"),
        "--output",
        str(shared),
        "--pull-secret",
        str(creds),
        *basic_registry.cli_args(),
    )
    assert_user_error(code, err, "sha256")
    assert shared.read_bytes() == module  # a failed pull leaves the previous file alone
