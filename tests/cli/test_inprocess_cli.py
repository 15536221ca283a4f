"""`sidecar envoy-config --in-process` and `sidecar up --in-process` as a user meets them: one-line refusals of
what only the ext_proc path has, a bootstrap real Envoy accepts, and `up` serving the bundled example from inside
Envoy."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sidecar.cli import main
from tests.support.wasm_fetch import assert_user_error

CONFIG = """\
chains:
  default:
    plugins: [header-stamp]
  admin:
    on_error: fail_open
    plugins: [header-stamp]
"""
DYNAMIC_MODULE_FILTER = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["envoy-config", "--in-process", "--plugin", "header-stamp"], ["--plugin", "-c FILE"]),
        (["envoy-config", "--in-process"], ["--in-process needs -c FILE"]),
        (
            ["envoy-config", "--in-process", "-c", "{config}", "--listen", "unix:/tmp/x.sock"],
            ["--listen", "no sidecar"],
        ),
        (["envoy-config", "--in-process", "-c", "{config}", "--workers", "2"], ["--workers", "no sidecar"]),
        (
            ["envoy-config", "--in-process", "-c", "{config}", "--failure-mode-allow"],
            ["--failure-mode-allow", "on_error: fail_open"],
        ),
        (["envoy-config", "-c", "{config}", "--env-file", "{tmp}/env"], ["--env-file", "only with --in-process"]),
        (
            ["envoy-config", "--in-process", "-c", "{config}", "--env-file", "{tmp}/missing/env"],
            ["--env-file {tmp}/missing/env", "cannot write"],
        ),
        (["envoy-config", "--in-process", "-c", "{tmp}/nope.yaml"], ["nope.yaml"]),
        (["envoy-config", "--in-process", "-c", "{config}", "--route", "/x=nochain"], ["no chain named 'nochain'"]),
        (["up", "--in-process", "-f", "{tmp}/gateway.yaml"], ["--in-process does not apply with -f"]),
        (["up", "--in-process", "--workers", "2"], ["--workers", "no sidecar"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], needles: list[str], config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill = {"config": str(config), "tmp": str(tmp_path)}
    code = main([arg.format(**fill) for arg in argv])
    out, err = capsys.readouterr()
    assert_user_error(code, err, *(needle.format(**fill) for needle in needles))
    assert out == ""  # no half bootstrap on stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sidecar.yaml"]  # and no file left behind


@pytest.mark.parametrize("value", ["0", "nan", "-1", "inf", "1e9", "soon"])
def test_a_bad_deadline_is_refused_before_anything_loads(
    value: str, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["envoy-config", "--in-process", "-c", str(config), "--message-timeout", value])
    out, err = capsys.readouterr()
    assert (exited.value.code, out) == (2, "")
    expected = f"--message-timeout: expected seconds from 0.001 to 3600, got {value!r}"
    assert err.strip().splitlines()[-1].endswith(expected)
    assert "Traceback" not in err


def test_a_config_files_deadline_is_checked_too() -> None:
    from sidecar.config import SidecarConfig
    from sidecar.errors import ConfigError
    from sidecar.stack.inprocess import hook_deadline_ms

    assert hook_deadline_ms(SidecarConfig(message_timeout=0.25)) == 250
    for bad in (0.0, float("nan"), -1.0, 1e9):
        with pytest.raises(ConfigError, match=r"expected seconds from 0\.001 to 3600"):
            hook_deadline_ms(SidecarConfig(message_timeout=bad))


def _http_filters(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    return filters


@pytest.mark.envoy
def test_envoy_config_in_process_is_a_bootstrap_envoy_loads(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.inprocess.module import envoy_environment

    env_file = tmp_path / "envoy.env"
    code = main(
        [
            *("envoy-config", "--in-process", "-c", str(config), "--route", "/admin=admin", "--route", "/"),
            *("--validate", "--env-file", str(env_file), "--message-timeout", "0.25"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    bootstrap = yaml.safe_load(out)
    filters = _http_filters(bootstrap)
    names = [f["name"] for f in filters]
    assert names == ["sidecar.inprocess.admin", "sidecar.inprocess.default", "envoy.filters.http.router"]
    for chain, entry in zip(("admin", "default"), filters, strict=False):
        assert entry["typed_config"]["@type"] == DYNAMIC_MODULE_FILTER
        loaded = json.loads(entry["typed_config"]["filter_config"]["value"])
        assert (loaded["config"], loaded["chain"], loaded["hook_deadline_ms"]) == (str(config.resolve()), chain, 250)
    clusters = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert clusters == ["upstream"]  # no sidecar to reach
    assert "ext_proc" not in out
    routes = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["routes"]
    off = {r["match"]["prefix"]: sorted(r["typed_per_filter_config"]) for r in routes}
    assert off == {"/admin": ["sidecar.inprocess.default"], "/": ["sidecar.inprocess.admin"]}
    written = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert written == envoy_environment()
    assert err == ""  # the environment went to the file


def test_envoy_config_in_process_prints_the_environment_on_stderr(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.inprocess.module import envoy_environment

    assert main(["envoy-config", "--in-process", "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    assert _http_filters(yaml.safe_load(out))[0]["name"] == "sidecar.inprocess.default"
    for key, value in envoy_environment().items():
        assert f"{key}={value}" in err


def test_help_names_the_trade_off(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("envoy-config", "up"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--in-process" in text and "takes Envoy down" in text and "one Python serves all" in text


@pytest.mark.envoy
def test_up_in_process_serves_the_bundled_example_from_inside_envoy() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "sidecar", "up", "--in-process", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stderr is not None
            url, lines = None, list[str]()
            deadline = time.monotonic() + 60
            while url is None and time.monotonic() < deadline:
                line = proc.stderr.readline()
                assert line, "sidecar up exited early: " + "".join(lines)
                lines.append(line)
                match = re.match(r"envoy\s+(http://\S+?)/", line)
                url = match.group(1) if match else None
            assert url is not None
            assert any("in-process, inside Envoy" in line for line in lines), lines
            response = httpx.post(url + "/login", json={"user": "ada", "password": "hunter2"}, timeout=20)
            echoed = response.json()
            assert "hunter2" not in response.text
            assert '"password":"[REDACTED]"' in echoed["body"]
            assert echoed["headers"]["x-stamped-by"] == "envoy-sidecar-demo"
            children = subprocess.run(["ps", "--ppid", str(proc.pid), "-o", "comm="], capture_output=True, text=True)
            assert "envoy" in children.stdout and "python" not in children.stdout  # no sidecar process
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0


def test_the_env_file_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    from sidecar.errors import ConfigError
    from sidecar.stack.inprocess import write_env_file

    path = tmp_path / "envoy.env"
    write_env_file(path, {"A": "/x y", "B": "2"})
    assert path.read_text() == "A=/x y\nB=2\n"
    for bad in ({"A": "one\ntwo"}, {"A": "nul\0"}):
        with pytest.raises(ConfigError, match="newline or NUL"):
            write_env_file(path, bad)
    assert path.read_text() == "A=/x y\nB=2\n"  # the earlier file, untouched
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match=r"--env-file .*dir: cannot write it"):
        write_env_file(tmp_path / "dir", {"A": "1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "envoy.env"]  # no temporary file left


@pytest.mark.envoy
def test_a_config_path_with_quotes_spaces_and_unicode_reaches_envoys_interpreter_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / 'dir with "quotes", spaces\\ and ünïcode'
    odd.mkdir()
    path = odd / "sidecar $HOME.yaml"
    path.write_text(CONFIG)
    code = main(["envoy-config", "--in-process", "-c", str(path), "--validate"])
    out, err = capsys.readouterr()
    assert code == 0, err  # Envoy's interpreter loaded that very file (validate mode runs the bridge's configure)
    loaded = json.loads(_http_filters(yaml.safe_load(out))[0]["typed_config"]["filter_config"]["value"])
    assert loaded["config"] == str(path.resolve())


@pytest.mark.envoy
def test_validate_passes_while_a_running_envoy_holds_the_metrics_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Validate mode runs the bridge's configure, which serves metrics: the port the running Envoy already serves
    (or a hot restart's parent holds) must not make a good config fail."""
    with socket.create_server(("127.0.0.1", 0)) as running_envoy:
        path = tmp_path / "sidecar.yaml"
        path.write_text(f'metrics: "127.0.0.1:{running_envoy.getsockname()[1]}"\n' + CONFIG)
        code = main(["envoy-config", "--in-process", "-c", str(path), "--validate"])
    _, err = capsys.readouterr()
    assert code == 0, err


def test_up_in_process_refuses_a_chain_it_cannot_run_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What Envoy would only log as "Failed to initialize dynamic module": said before anything starts."""
    config = tmp_path / "duplex.yaml"
    config.write_text('chains:\n  default: {plugins: ["tests.support.testplugins:FdPass"]}\n')
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["up", "--in-process", "-c", str(config), "--port", "0"])
    finally:
        for sig, handler in handlers.items():  # `up` installs its own: give pytest's back
            signal.signal(sig, handler)
    _, err = capsys.readouterr()
    assert_user_error(code, err, "chain 'default': FULL_DUPLEX_STREAMED bodies cannot run in-process")
