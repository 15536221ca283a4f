"""Secrets never reach a log, stderr, an exception (as a traceback would render it) or `--json`.

Every fetch and auth failure path runs with known passwords, tokens and signed-URL queries; all that
is written is scanned for them and for their base64 forms. Logging is captured at DEBUG for every
logger (urllib3's included), more than the sidecar ever enables."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.errors import SidecarError
from sidecar.wasm.fetch.cache import ModuleCache
from sidecar.wasm.fetch.fetcher import ModuleFetcher
from sidecar.wasm.fetch.transfer import FetchOptions
from tests.support.wasm_fetch import Answer, Registry, ScriptedServer, make_module, run, serve_image

USER_NAME = "carol"
SECRET_PASSWORD = "pw-SECRET-8c41d7"
SECRET_TOKEN = "tok.SECRETTOKEN.5e0f9a"
SECRET_QUERY = "X-Amz-Signature=SECRETSIG3b7a"
SECRETS = (SECRET_PASSWORD, SECRET_TOKEN, "SECRETSIG3b7a")


def _forms(secret: str) -> list[str]:
    """The secret, and the encodings it travels in."""
    plain = secret.encode()
    forms = [secret, base64.b64encode(plain).decode(), base64.urlsafe_b64encode(plain).decode().rstrip("=")]
    basic = base64.b64encode(f"{USER_NAME}:{secret}".encode()).decode()
    return [*forms, basic, basic.rstrip("=")]


def _config(path: Path, host: str, password: str = SECRET_PASSWORD) -> Path:
    auth = base64.b64encode(f"{USER_NAME}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


Scenario = Callable[[ScriptedServer, Path], list[str]]


def _token_then_refused(srv: ScriptedServer, tmp: Path) -> list[str]:
    """A token is issued, then the registry refuses it."""
    challenge = f'Bearer realm="http://{srv.host}/token",service="reg",scope="repository:s/m:pull"'
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b"")]
    srv.routes["/token"] = [(200, {}, json.dumps({"token": SECRET_TOKEN}).encode())]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _token_then_forbidden_echo(srv: ScriptedServer, tmp: Path) -> list[str]:
    """The registry echoes the token and password in an error body and a challenge parameter."""
    challenge = f'Bearer realm="http://{srv.host}/token",service="reg"'
    echo = json.dumps({"errors": [{"code": "DENIED", "message": f"{SECRET_TOKEN} {SECRET_PASSWORD}"}]}).encode()
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b""), (403, {}, echo)]
    srv.routes["/token"] = [(200, {}, json.dumps({"access_token": SECRET_TOKEN}).encode())]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _token_reply_junk(srv: ScriptedServer, tmp: Path) -> list[str]:
    """The token endpoint answers with the password and a bad token in junk."""
    challenge = f'Bearer realm="http://{srv.host}/token",service="reg"'
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b"")]
    srv.routes["/token"] = [(200, {}, json.dumps({"token": f"{SECRET_TOKEN}\r\nX: {SECRET_PASSWORD}"}).encode())]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _token_reply_not_json(srv: ScriptedServer, tmp: Path) -> list[str]:
    challenge = f'Bearer realm="http://{srv.host}/token",service="reg"'
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b"")]
    srv.routes["/token"] = [(200, {}, f"<html>{SECRET_PASSWORD} {SECRET_TOKEN}".encode())]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _token_endpoint_refuses(srv: ScriptedServer, tmp: Path) -> list[str]:
    challenge = f'Bearer realm="http://{srv.host}/token",service="reg",error="{SECRET_TOKEN}"'
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b"")]
    srv.routes["/token"] = [(401, {}, SECRET_PASSWORD.encode())]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _token_trickle(srv: ScriptedServer, tmp: Path) -> list[str]:
    challenge = f'Bearer realm="http://{srv.host}/token",service="reg"'
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b"")]
    body = json.dumps({"token": SECRET_TOKEN * 10}).encode()
    srv.routes["/token"] = [Answer(200, {}, body, drip=0.2)]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host)), "--deadline", "1.5"]


def _untrusted_realm(srv: ScriptedServer, tmp: Path) -> list[str]:
    challenge = f'Bearer realm="http://127.0.0.1:1/token?{SECRET_QUERY}",service="reg"'
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": challenge}, b"")]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _basic_rejected(srv: ScriptedServer, tmp: Path) -> list[str]:
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": 'Basic realm="reg"'}, SECRET_PASSWORD.encode())]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _basic_then_server_error(srv: ScriptedServer, tmp: Path) -> list[str]:
    srv.routes["/v2/s/m/manifests/v1"] = [(401, {"WWW-Authenticate": 'Basic realm="reg"'}, b""), (500, {}, b"")]
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _blob_redirect_with_signed_query(srv: ScriptedServer, tmp: Path) -> list[str]:
    """A signed object-storage URL that downgrades, and another that fails."""
    module = make_module(100, seed="secret-blob")
    serve_image(srv, "s/m", module, blob_answer=(307, {"Location": f"http://localhost:1/blob?{SECRET_QUERY}"}, b""))
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(_config(tmp / "c.json", srv.host))]


def _signed_url_failures(srv: ScriptedServer, tmp: Path) -> list[str]:
    srv.routes["/m.wasm"] = [(503, {}, SECRET_QUERY.encode())]
    return [srv.url(f"/m.wasm?{SECRET_QUERY}"), "--retries", "1"]


def _signed_url_wrong_sha(srv: ScriptedServer, tmp: Path) -> list[str]:
    srv.routes["/m.wasm"] = [(200, {}, make_module(100, seed="signed"))]
    return [srv.url(f"/m.wasm?{SECRET_QUERY}"), "--sha256", "0" * 64]


def _signed_url_redirect_downgrade(srv: ScriptedServer, tmp: Path) -> list[str]:
    srv.routes["/m.wasm"] = [(302, {"Location": f"http://localhost:1/x.wasm?{SECRET_QUERY}"}, b"")]
    return [srv.url(f"/m.wasm?{SECRET_QUERY}")]


def _url_with_userinfo(srv: ScriptedServer, tmp: Path) -> list[str]:
    return [f"http://{USER_NAME}:{SECRET_PASSWORD}@{srv.host}/m.wasm"]


def _bad_pull_secret_file(srv: ScriptedServer, tmp: Path) -> list[str]:
    path = tmp / "bad.json"
    path.write_text(json.dumps({"auths": {srv.host: {"auth": f"{SECRET_PASSWORD}!!"}}}))
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(path)]


def _pull_secret_without_colon(srv: ScriptedServer, tmp: Path) -> list[str]:
    path = tmp / "bad.json"
    path.write_text(json.dumps({"auths": {srv.host: {"auth": base64.b64encode(SECRET_PASSWORD.encode()).decode()}}}))
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(path)]


def _pull_secret_not_yaml(srv: ScriptedServer, tmp: Path) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_text(f"auths: [{SECRET_PASSWORD}: {{\n")
    return [f"{srv.host}/s/m:v1", "--pull-secret", str(path)]


SCENARIOS: dict[str, Scenario] = {
    fn.__name__.lstrip("_"): fn
    for fn in (
        _token_then_refused,
        _token_then_forbidden_echo,
        _token_reply_junk,
        _token_reply_not_json,
        _token_endpoint_refuses,
        _token_trickle,
        _untrusted_realm,
        _basic_rejected,
        _basic_then_server_error,
        _blob_redirect_with_signed_query,
        _signed_url_failures,
        _signed_url_wrong_sha,
        _signed_url_redirect_downgrade,
        _url_with_userinfo,
        _bad_pull_secret_file,
        _pull_secret_without_colon,
        _pull_secret_not_yaml,
    )
}


def _assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        for form in _forms(secret):
            assert form not in text, f"{where} contains {form!r}:\n{text}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_secret_in_any_output(
    name: str,
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    argv = SCENARIOS[name](scripted_server, tmp_path)
    common = ("--cache-dir", str(tmp_path / "cache"), "--insecure-registry", scripted_server.host, "--timeout", "2")
    code, out, err = run(capsys, "wasm", "pull", "--json", *argv, *common)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    _assert_clean(out, "stdout (--json)")
    _assert_clean(err, "stderr")
    _assert_clean(caplog.text, "the log")
    _assert_clean("\n".join(r.getMessage() for r in caplog.records), "log messages")
    # The same through the API: the exception as a traceback would render it.
    if "--pull-secret" in argv or argv[0].startswith("http"):
        _assert_clean(_rendered_failure(argv, scripted_server, tmp_path), "the exception")
    index = tmp_path / "cache" / "index.json"
    if index.exists():
        _assert_clean(index.read_text(), "index.json")


def _rendered_failure(argv: list[str], srv: ScriptedServer, tmp: Path) -> str:
    from sidecar.wasm.fetch.auth import load_pull_secret

    options = FetchOptions(insecure_hosts=frozenset({srv.host}), request_timeout=2, deadline=3, http_retries=1)
    fetcher = ModuleFetcher(ModuleCache(tmp / "api-cache"), options)
    try:
        if argv[0].startswith("http"):
            sha = argv[argv.index("--sha256") + 1] if "--sha256" in argv else None
            fetcher.pull_http(argv[0], sha256=sha)
        else:
            fetcher.pull_image(argv[0], pull_secret=load_pull_secret(argv[argv.index("--pull-secret") + 1]))
    except SidecarError as exc:
        return "".join(traceback.format_exception(exc)) + repr(exc)
    raise AssertionError("the scenario was expected to fail")


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_real_registry_wrong_password_and_push(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real registry (htpasswd basic, and bearer tokens from the issuer), wrong credentials."""
    caplog.set_level(logging.DEBUG)
    registry: Registry = request.getfixturevalue(f"{kind}_registry")
    module = tmp_path / "m.wasm"
    module.write_bytes(make_module(100, seed="secret-push"))
    creds = _config(tmp_path / "c.json", registry.host)
    ref = f"{registry.host}/secret/{kind}:1"
    outputs = []
    for argv in (
        ("pull", "--json", ref, "--cache-dir", str(tmp_path / "cache")),
        ("push", "--json", str(module), ref),
    ):
        code, out, err = run(capsys, "wasm", *argv, "--pull-secret", str(creds), *registry.cli_args())
        assert code == 2, err
        outputs += [out, err]
    _assert_clean("\n".join(outputs), "output")
    _assert_clean(caplog.text, "the log")


def test_signed_url_success_keeps_the_query_out_of_json_ls_and_index(
    scripted_server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    module = make_module(100, seed="signed-ok")
    scripted_server.routes["/m.wasm"] = [(200, {}, module)]
    args = ("--cache-dir", str(tmp_path), "--insecure-registry", scripted_server.host)
    code, out, err = run(capsys, "wasm", "pull", "--json", scripted_server.url(f"/m.wasm?{SECRET_QUERY}"), *args)
    assert code == 0 and json.loads(out)["sha256"] == hashlib.sha256(module).hexdigest(), err
    code, listing, _ = run(capsys, "wasm", "ls", "--json", "--cache-dir", str(tmp_path))
    assert code == 0
    _assert_clean(out + err + listing + (tmp_path / "index.json").read_text(), "output")
    _assert_clean(caplog.text, "the log")
