"""`sidecar wasm run`: what it prints matches what Envoy does; user mistakes are one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.stack.envoy import Envoy
from tests.support import wat
from tests.support.wasm_host import bootstrap, echo_server, normalized, send


@pytest.mark.envoy
def test_json_output_matches_envoy(
    sdk_modules: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = sdk_modules["gcore_conformance"]
    body_file = tmp_path / "body.txt"
    body_file.write_bytes(b"the secret word")
    with echo_server() as echo:
        with Envoy(bootstrap(module, root_id="fixture", configuration="cli", upstream_port=echo.port)) as envoy:
            denied = send(envoy, "GET", "/x", [("host", "example.com"), ("x-deny", "1")], b"")
            send(envoy, "POST", "/y", [("host", "example.com"), ("x-rewrite", "1")], body_file.read_bytes())
        upstream_seen = echo.seen[-1]

    common = [str(module), "--name", "fixture", "--root-id", "fixture", "--config", "cli", "--json"]
    assert main(["wasm", "run", *common, "--header", "x-deny:1", "--path", "/x"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["local_response"]["status"] == denied.status
    response = report["response"]
    assert (response["status"], response["body"].encode()) == (denied.status, denied.body)
    assert normalized([tuple(h) for h in response["headers"]]) == normalized(denied.headers)

    args = ["--method", "POST", "--path", "/y", "--header", "x-rewrite:1", "--body", f"@{body_file}"]
    assert main(["wasm", "run", *common, *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["upstream_request"]["body"].encode() == upstream_seen.body
    sent = [tuple(h) for h in report["upstream_request"]["headers"] if h[0] != ":authority"]
    assert normalized(sent) == normalized([h for h in upstream_seen.headers if h[0] != "host"])


def test_text_output(sdk_modules: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    module = sdk_modules["solo_conformance"]
    assert main(["wasm", "run", str(module), "--root-id", "fixture", "--config", "t", "--header", "x-deny:1"]) == 0
    out = capsys.readouterr().out
    assert "request_headers" in out and "local response sent by the module: 403 (denied)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["oci://ghcr.io/acme/filter:1.0"], "registry and URL references are not supported"),
        (["/nonexistent/filter.wasm"], "/nonexistent/filter.wasm: no such file"),
        (["{module}", "--header", "no-colon"], "--header 'no-colon' is not in the form NAME:VALUE"),
        (["{module}", "--config", "@/nonexistent.json"], "--config: cannot read /nonexistent.json"),
        (["{bogus}"], "not a WebAssembly module"),
        (["{trap}"], "proxy_on_request_headers failed: trap:"),
    ],
)
def test_user_errors_are_one_line(
    argv: list[str],
    message: str,
    sdk_modules: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bogus = tmp_path / "bogus.wasm"
    bogus.write_text("not wasm")
    trap = tmp_path / "trap.wat"
    trap.write_text(wat.TRAP)
    paths = {"module": sdk_modules["gcore_conformance"], "bogus": bogus, "trap": trap}
    assert main(["wasm", "run", *[a.format(**paths) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err
