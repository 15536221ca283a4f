"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from sidecar.stack.envoy import validate_bootstrap
from tests.support.wait import wait_for


def sidecar(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def alive(proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"the server exited with code {proc.returncode}"
    return True


def assert_user_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sidecar: error: ")
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plugin", "no-such-plugin"], "unknown plugin 'no-such-plugin'"),
        (["--plugin", "tests.support.broken_module:X"], "definitely_missing_dependency"),
        (["--plugin", "header-stamp", "--socket-mode", "0777"], "world-writable"),
        (["--plugin", "header-stamp", "--workers", "0"], "--workers: expected a number >= 1"),
        (["--plugin", "header-stamp", "--listen", "tcp:x"], "--listen: expected unix:PATH"),
        (["--plugin", "header-stamp", "--listen", "unix:/proc/nope/s.sock"], "cannot create socket directory"),
        (["--plugin", "header-stamp", "--listen", "unix:/tmp/" + "x" * 120], "longer than 107 bytes"),
        ([], "no plugins configured"),
        (["--plugin", "header-stamp", "--tcp", "nonsense"], "--tcp: expected HOST:PORT, got 'nonsense'"),
        (["--plugin", "header-stamp", "--metrics", "9464"], "--metrics: expected HOST:PORT"),
        (
            ["--plugin", "header-stamp", "--envoy-processing-mode", "request_body=BUFFERED"],
            "unknown field 'request_body'",
        ),
        (["--plugin", "header-stamp", "--envoy-processing-mode", "request_body_mode=SEND"], "request_body_mode='SEND'"),
        (["--plugin", "header-stamp", "--envoy-processing-mode", "request_header_mode"], "request_header_mode=''"),
        (["--plugin", "json-redact", "--envoy-processing-mode", ""], "request_body_mode=NONE, but the plugins need"),
        (
            ["--plugin", "body-digest", "--envoy-processing-mode", "request_body_mode=BUFFERED_PARTIAL"],
            "request_body_mode=BUFFERED_PARTIAL, but the plugins need STREAMED (chain 'default': body-digest)",
        ),
        (
            # Bodies no plugin reads would each be answered with a protocol error: an outage, not "more".
            ["--plugin", "header-stamp", "--envoy-processing-mode", "response_body_mode=BUFFERED"],
            "response_body_mode=BUFFERED, but no plugin reads that body",
        ),
    ],
)
def test_serve_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    if "--listen" not in args:
        args = [*args, "--listen", f"unix:{tmp_path}/s.sock"]
    assert_user_error(sidecar("serve", *args), message)
    assert not (tmp_path / "s.sock").exists()  # nothing started


#: Two plugins declaring what they need from Envoy (the second twice, in two chains), for the --envoy-* checks.
DECLARING_PLUGINS = """\
from sidecar import Plugin


class Audit(Plugin):
    name = "audit"
    metadata_namespaces = ("audit",)
    forwarding_namespaces = ("envoy.filters.http.jwt_authn",)
    request_attributes = ("request.path", "source.address")
    response_attributes = ("response.code",)

    def on_request_headers(self, ctx, headers):
        pass


class Wide(Plugin):
    name = "wide"
    request_attributes = tuple(f"request.attr_{i}" for i in range(64))

    def on_request_headers(self, ctx, headers):
        pass
"""


def _serve_declaring(
    tmp_path: Path, *flags: str, chains: str = "default: [declaring:Audit]", command: str = "serve"
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "declaring.py").write_text(DECLARING_PLUGINS)
    (tmp_path / "c.yaml").write_text(f"chains:\n  {chains}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", command, "-c", str(tmp_path / "c.yaml"), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--envoy-receiving-namespaces", "envoy-sidecar"],
            "--envoy-receiving-namespaces: Envoy's ext_proc filter does not accept dynamic metadata from the sidecar "
            "in 'audit' (metadata_namespaces of plugin 'audit' in chain 'default'); add it to Envoy's "
            "metadata_options.receiving_namespaces (Helm: extProc.metadata.writableNamespaces)",
        ),
        (
            ["--envoy-receiving-namespaces", "audit"],
            "'envoy-sidecar' (the sidecar's own namespace, where ctx.set_metadata writes by default)",
        ),
        (["--envoy-receiving-namespaces", ""], "in 'envoy-sidecar' (the sidecar's own namespace"),
        (["--envoy-receiving-namespaces", "Audit,envoy-sidecar"], "in 'audit'"),  # names are exact
        (
            ["--envoy-forwarding-namespaces", "envoy.filters.http.jwt_auth"],
            "does not forward dynamic metadata to the sidecar from 'envoy.filters.http.jwt_authn'",
        ),
        (
            ["--envoy-request-attributes", ","],
            "does not send the request attributes 'request.path' (request_attributes of plugin 'audit' in chain "
            "'default'), 'source.address' (",
        ),
        (["--envoy-request-attributes", "request.path"], "the request attribute 'source.address' ("),
        (["--envoy-response-attributes", "request.code"], "(Helm: extProc.processingMode.response.attributes)"),
        # The first flag that falls short is named, whatever the order on the command line.
        (
            ["--envoy-response-attributes", "", "--envoy-processing-mode", "request_header_mode=SKIP"],
            "--envoy-processing-mode: Envoy is configured with request_header_mode=SKIP",
        ),
    ],
)
def test_serve_refuses_what_envoy_was_not_given_in_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    proc = _serve_declaring(tmp_path, *flags, "--listen", f"unix:{tmp_path}/s.sock")
    assert_user_error(proc, message)
    assert "or change the plugins" in proc.stderr
    assert not (tmp_path / "s.sock").exists()


def test_serve_names_every_declarer_and_bounds_the_line(tmp_path: Path) -> None:
    chains = "default: [declaring:Audit, declaring:Wide]\n  admin: [declaring:Wide]"
    proc = _serve_declaring(tmp_path, "--envoy-request-attributes", "source.address", chains=chains)
    assert_user_error(
        proc,
        "'request.path' (request_attributes of plugin 'audit' in chain 'default'), 'request.attr_0' "
        "(request_attributes of plugin 'wide' in chain 'default', plugin 'wide' in chain 'admin')",
    )
    assert "and 57 more; add them to Envoy's request_attributes" in proc.stderr  # 65 missing, 8 listed
    assert "request.attr_7'" not in proc.stderr and len(proc.stderr) < 2000


def test_serve_grants_more_than_declared_and_checks_only_the_flags_given(tmp_path: Path) -> None:
    """Extra names and spaces are fine; the check passes and serve goes on (here to a socket it cannot make)."""
    grants = [
        "--envoy-receiving-namespaces", " envoy-sidecar , audit , spare ",
        "--envoy-request-attributes", "request.path,source.address,request.method",
        "--envoy-response-attributes", "response.code",
    ]  # fmt: skip
    assert_user_error(
        _serve_declaring(tmp_path, *grants, "--listen", "unix:/proc/nope/s.sock"), "cannot create socket directory"
    )


def test_plugins_lists_what_each_chain_declares(tmp_path: Path) -> None:
    chains = "default: [header-stamp, declaring:Audit]\n  admin: [header-stamp]"
    proc = _serve_declaring(tmp_path, "--json", chains=chains, command="plugins")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["chains"]
    assert report["default"]["declares"] == {
        "metadata_namespaces": ["audit"],
        "forwarding_namespaces": ["envoy.filters.http.jwt_authn"],
        "request_attributes": ["request.path", "source.address"],
        "response_attributes": ["response.code"],
    }
    assert not any(report["admin"]["declares"].values())
    text = _serve_declaring(tmp_path, chains=chains, command="plugins").stdout
    assert re.search(r"^  request_attributes\s+request.path, source.address$", text, flags=re.MULTILINE), text


def test_invalid_config_value_names_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("plugins: [header-stamp]\ngrace_period: soon\n")
    assert_user_error(sidecar("serve", "-c", str(config)), f"{config}: grace_period: expected a number")
    config.write_text("plugins:\n  - use: json-redact\n    config: {max_bytes: -1}\n")
    assert_user_error(sidecar("serve", "-c", str(config)), "plugin 'json-redact': invalid config: max_bytes")


def test_live_socket_is_refused_and_stale_one_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--plugin", "header-stamp", "--listen", f"unix:{sock}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: alive(proc) and sock.exists(), 20, "the first server's socket")
        assert_user_error(sidecar("serve", "--plugin", "header-stamp", "--listen", f"unix:{sock}"), "in use")
    finally:
        proc.kill()  # no cleanup: leaves a stale socket behind
        proc.wait()
    assert sock.exists()
    second = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--plugin", "header-stamp", "--listen", f"unix:{sock}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        from sidecar.stack.sidecar import health_status

        wait_for(lambda: alive(second) and health_status(sock) == "SERVING", 20, "the second server")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0


def test_plugins_lists_chains_and_modes() -> None:
    proc = sidecar("plugins", "--plugin", "json-redact")
    assert proc.returncode == 0
    assert "header-stamp = sidecar_plugins.stamp:HeaderStamp" in proc.stdout
    assert re.search(r"request_body\s+json-redact", proc.stdout)
    assert "request_body_mode=BUFFERED" in proc.stdout


def test_plugins_lists_chunk_and_stream_hooks_in_call_order(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "chains:\n  default: [header-stamp, body-digest, sse-meter]\n"
        "  both:\n    plugins:\n      - use: tests.support.testplugins:StreamPass\n      - use: sse-meter\n"
    )
    proc = sidecar("plugins", "-c", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    chains = json.loads(proc.stdout)["chains"]
    assert chains["default"]["hooks"] == {
        "request_headers": ["header-stamp"],
        "request_chunk": ["body-digest"],
        "request_trailers": ["body-digest"],
        "response_headers": ["sse-meter", "header-stamp"],
        "response_chunk": ["sse-meter"],
    }
    stream_pass, sse_meter = chains["both"]["plugins"]
    assert chains["both"]["hooks"]["request_chunk"] == [stream_pass]
    assert chains["both"]["hooks"]["response_chunk"] == [sse_meter, stream_pass]  # responses unwind
    text = sidecar("plugins", "-c", str(config)).stdout
    assert re.search(r"^  request_chunk\s+body-digest$", text, flags=re.MULTILINE), text
    duplex = json.loads(sidecar("plugins", "--plugin", "jsonl-tag", "--json").stdout)["chains"]["default"]
    assert duplex["hooks"] == {"response_headers": ["jsonl-tag"], "response_stream": ["jsonl-tag"]}


def test_envoy_config_validates_with_envoy(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("workers: 3\nchains:\n  default: [header-stamp]\n  admin: [json-redact]\n")
    proc = sidecar("envoy-config", "-c", str(config), "--route", "/admin=admin", "--validate")
    assert proc.returncode == 0, proc.stderr
    bootstrap = yaml.safe_load(proc.stdout)
    cluster = bootstrap["static_resources"]["clusters"][0]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["pipe"]["path"] for e in endpoints] == [
        f"/tmp/envoy-sidecar/extproc-{i}.sock" for i in range(3)
    ]
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["message_timeout"] == "0.500s"
    assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
    validate_bootstrap(bootstrap)
    assert_user_error(sidecar("envoy-config", "-c", str(config), "--route", "/x=nope"), "no chain named 'nope'")


def test_validate_reports_envoys_reason() -> None:
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError, match="Envoy rejected"):
        validate_bootstrap({"static_resources": {"clusters": [{"name": "x", "type": "NOPE"}]}})


@pytest.mark.envoy
def test_up_runs_the_bundled_example_and_stops_on_ctrl_c() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "sidecar", "up", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stderr is not None
            url = None
            deadline = time.monotonic() + 60
            while url is None and time.monotonic() < deadline:
                line = proc.stderr.readline()
                assert line, "sidecar up exited early"
                match = re.match(r"envoy\s+(http://\S+?)/", line)
                url = match.group(1) if match else None
            assert url is not None
            response = httpx.post(url + "/login", json={"user": "ada", "password": "hunter2"})
            echoed = response.json()
            assert "hunter2" not in response.text
            assert '"password":"[REDACTED]"' in echoed["body"]
            assert echoed["headers"]["x-stamped-by"] == "envoy-sidecar-demo"
            assert response.headers["server-timing"].startswith("sidecar;dur=")
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0


def test_help_loads_no_heavy_dependency() -> None:
    """The CLI imports what a command needs inside the command: `sidecar --help` stays fast."""
    probe = (
        "import json, sys\n"
        "from sidecar.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert loaded.isdisjoint({"grpc", "wasmtime", "oras", "requests", "envoy_data_plane", "prometheus_client"})
