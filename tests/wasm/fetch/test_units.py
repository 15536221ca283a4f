"""Pure parts: references, pull-secret parsing, progress output."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.cli.wasm_fetch import ProgressLine
from sidecar.wasm.fetch.auth import load_pull_secret, resolve_credentials
from sidecar.wasm.fetch.errors import BadReferenceError, CredentialsFileError
from sidecar.wasm.fetch.reference import parse_image_ref

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci://ghcr.io/acme/filter", ("ghcr.io", "acme/filter", "latest", None)),
        ("localhost:5000/f:v1", ("localhost:5000", "f", "v1", None)),
        (f"127.0.0.1:5000/a/b@{DIGEST}", ("127.0.0.1:5000", "a/b", None, DIGEST)),
        (f"r.example/a:1.2@{DIGEST}", ("r.example", "a", "1.2", DIGEST)),
        ("envoy-filter", ("docker.io", "library/envoy-filter", "latest", None)),
    ],
)
def test_parse_image_ref(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = parse_image_ref(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected
    assert ref.reference == (expected[3] or expected[2])


@pytest.mark.parametrize("text", ["r.example/a:b:c", "r.example//a", "r.example/a@md5:00", "r.example/a:-x"])
def test_parse_image_ref_rejects(text: str) -> None:
    with pytest.raises(BadReferenceError, match="image reference"):
        parse_image_ref(text)


def test_docker_config_keys_and_precedence(tmp_path: Path) -> None:
    auth = base64.b64encode(b"carol:s3cret").decode()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"https://r.example:5000/v1/": {"auth": auth}}}))
    found = resolve_credentials("r.example:5000", load_pull_secret(config), environ={})
    assert found is not None and (found.username, found.password) == ("carol", "s3cret")
    assert "s3cret" not in repr(found)
    env = {"SIDECAR_REGISTRY_USERNAME": "dave", "SIDECAR_REGISTRY_PASSWORD": "pw", "HOME": str(tmp_path)}
    from_env = resolve_credentials("r.example:5000", None, environ=env)
    assert from_env is not None and from_env.username == "dave"
    with pytest.raises(CredentialsFileError, match=r"no credentials for registry 'other\.example'"):
        resolve_credentials("other.example", load_pull_secret(config), environ={})
    helper = tmp_path / "helper.json"
    helper.write_text(json.dumps({"auths": {}, "credHelpers": {"r.example:5000": "ecr-login"}}))
    with pytest.raises(CredentialsFileError, match="credential helper"):
        load_pull_secret(helper).credentials_for("r.example:5000")


def test_secret_manifest_errors(tmp_path: Path) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text("kind: Secret\ntype: kubernetes.io/dockerconfigjson\ndata: {.dockerconfigjson: '%%%'}\n")
    with pytest.raises(CredentialsFileError, match=r"data\['.dockerconfigjson'\] is not base64"):
        load_pull_secret(bad)
    with pytest.raises(CredentialsFileError, match="cannot read"):
        load_pull_secret(tmp_path / "missing.json")


def test_progress_appears_only_after_a_second() -> None:
    now = [100.0]
    out = io.StringIO()
    progress = ProgressLine(out, clock=lambda: now[0])
    now[0] = 100.5
    progress(1 << 20, 10 << 20)
    assert out.getvalue() == ""
    now[0] = 101.5
    progress(3 << 20, 10 << 20)
    assert "3.0 / 10.0 MiB" in out.getvalue()
    progress.finish()
    assert out.getvalue().endswith("\n")


@pytest.mark.parametrize(
    "option", ["--timeout=0", "--deadline=-1", "--max-size=0", "--cache-max-bytes=0", "--retries=-2", "--timeout=x"]
)
def test_a_number_that_cannot_work_is_refused_in_one_line(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["wasm", "pull", "registry.example/team/filter:1", option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sidecar wasm pull: error: argument ") and option.split("=")[0] in err[-1]
