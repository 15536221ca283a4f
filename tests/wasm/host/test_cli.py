"""`sidecar wasm run`: what it prints matches what Envoy does; user mistakes are one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
        # A reference is pulled first (tests/wasm/fetch/test_run_reference.py); nothing listens on port 1.
        (["oci://127.0.0.1:1/acme/filter:1.0", "--cache-dir", "{tmp}"], "cannot reach registry 127.0.0.1:1"),
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
    paths = {"module": sdk_modules["gcore_conformance"], "bogus": bogus, "trap": trap, "tmp": tmp_path / "cache"}
    assert main(["wasm", "run", *[a.format(**paths) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def _run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    assert main(["wasm", "run", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def _header(part: dict[str, Any], name: str) -> str:
    return next((str(v) for k, v in part["headers"] if k == name), "<absent>")


@pytest.mark.parametrize(
    ("extra", "status"),
    [([], "503"), (["--callout-failure", "timeout"], "504"), (["--callout-status", "201"], "201")],
    ids=["default-is-envoys-connect-failure", "timeout", "answered"],
)
def test_callouts_fail_as_envoy_fails_them_by_default(
    extra: list[str], status: str, sdk_modules: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    module = str(sdk_modules["gcore_conformance"])
    report, _ = _run_json([module, "--root-id", "fixture", "--config", "t", "--header", "x-callout:1", *extra], capsys)
    assert _header(report["upstream_request"], "x-callout-status") == status


def test_real_callouts_and_upstream(sdk_modules: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    module = str(sdk_modules["gcore_conformance"])
    with echo_server() as echo:
        address = f"127.0.0.1:{echo.port}"
        argv = [module, "--root-id", "fixture", "--config", "t", "--header", "x-callout:1"]
        report, _ = _run_json([*argv, "--cluster", f"echo={address}", "--upstream", address], capsys)
        assert [s.path for s in echo.seen] == ["/callout", "/"]
    assert _header(report["upstream_request"], "x-callout-body") == "callout-body"
    assert report["response"]["body"] == "echo GET /"


def test_framing_and_loud_warnings(sdk_modules: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    module = str(sdk_modules["gcore_probe"])
    argv = [module, "--root-id", "probe", "--config", "c", "--method", "POST", "--body", "hello"]
    http1, _ = _run_json([*argv, "--header", "x-req-body:trace"], capsys)
    whole, _ = _run_json([*argv, "--header", "x-req-body:trace", "--framing", "whole"], capsys)
    assert _header(http1["response"], "x-r-request-body").count(",") == 1  # data, then the empty end call
    assert _header(whole["response"], "x-r-request-body").startswith("5/1/")
    grown, err = _run_json([*argv, "--header", "x-req-body:grow"], capsys)
    assert grown["warnings"] and "content-length still says 5" in grown["warnings"][0]
    assert err.startswith("warning: the request body grew")
    assert main(["wasm", "run", *argv, "--header", "x-req-body:grow"]) == 0
    assert "WARNING: the request body grew" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", "auth"], "--cluster 'auth' is not in the form NAME=VALUE"),
        (["--cluster", "auth=nowhere"], "upstream address 'nowhere' is not HOST:PORT"),
        (["--upstream", "localhost"], "upstream address 'localhost' is not HOST:PORT"),
        (["--framing", "http3"], "invalid choice: 'http3'"),
    ],
)
def test_bad_upstream_options_are_one_line(
    argv: list[str], message: str, sdk_modules: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    module = str(sdk_modules["gcore_conformance"])
    try:
        code = main(["wasm", "run", module, "--root-id", "fixture", "--config", "t", *argv])
    except SystemExit as exit_:  # argparse's own refusal
        code = int(exit_.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
