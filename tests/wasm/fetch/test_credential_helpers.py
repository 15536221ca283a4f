"""Docker credential helpers are not run; the error names the one that holds the credentials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.wasm.fetch.auth import load_pull_secret
from sidecar.wasm.fetch.errors import CredentialsFileError
from tests.support.wasm_fetch import Registry, assert_user_error, make_module, pull_json, run


def _docker_config(directory: Path, document: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(document))
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    monkeypatch.delenv("SIDECAR_REGISTRY_USERNAME", raising=False)
    monkeypatch.delenv("SIDECAR_REGISTRY_PASSWORD", raising=False)
    return directory / "config.json"


@pytest.fixture
def pushed(basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    module = tmp_path / "m.wasm"
    module.write_bytes(make_module(500, seed="helpers"))
    ref = f"{basic_registry.host}/helpers/filter:v1"
    creds = basic_registry.config_json(tmp_path / "push.json")
    code, _, err = run(
        capsys, "wasm", "push", str(module), ref, "--pull-secret", str(creds), *basic_registry.cli_args()
    )
    assert code == 0, err
    return ref


def test_creds_store_is_named_when_the_registry_asks_for_credentials(
    basic_registry: Registry,
    pushed: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _docker_config(tmp_path / "docker", {"auths": {}, "credsStore": "desktop"}, monkeypatch)
    code, _, err = run(capsys, "wasm", "pull", pushed, "--cache-dir", str(tmp_path / "c"), *basic_registry.cli_args())
    assert_user_error(code, err, "requires credentials", f"{config} keeps credentials", "'desktop'")
    assert "docker-credential-desktop" in err


def test_creds_store_does_not_shadow_auths_for_the_registry(
    basic_registry: Registry,
    pushed: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written = basic_registry.config_json(tmp_path / "plain.json")
    document = json.loads(written.read_text())
    document["credsStore"] = "desktop"
    _docker_config(tmp_path / "docker", document, monkeypatch)
    pulled = pull_json(capsys, pushed, "--cache-dir", str(tmp_path / "c"), *basic_registry.cli_args())
    assert pulled["cache_hit"] is False


def test_cred_helpers_entry_names_the_helper(
    basic_registry: Registry,
    pushed: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _docker_config(tmp_path / "docker", {"credHelpers": {basic_registry.host: "ecr-login"}}, monkeypatch)
    code, _, err = run(capsys, "wasm", "pull", pushed, "--cache-dir", str(tmp_path / "c"), *basic_registry.cli_args())
    assert_user_error(code, err, "credential helper 'ecr-login'", "docker-credential-ecr-login")


@pytest.mark.parametrize("field", ["credsStore", "credHelpers"])
def test_a_hostile_helper_name_stays_one_short_line(tmp_path: Path, field: str) -> None:
    name = "evil\nsidecar: error: forged line\x1b[2J" + "x" * 100_000
    value: object = name if field == "credsStore" else {"r.example:5000": name}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {}, field: value}))
    config = load_pull_secret(path)
    if field == "credsStore":
        hint = config.store_hint("r.example:5000")
        assert hint is not None
        message = hint
    else:
        with pytest.raises(CredentialsFileError) as raised:
            config.credentials_for("r.example:5000")
        message = str(raised.value)
    assert "\n" not in message and "\x1b" not in message
    assert len(message) < 600
