"""README's quick start as written: `serve` and `envoy-config` read the socket from the same config file."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from sidecar.stack.sidecar import health_status
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


def _quick_start(tmp_path: Path) -> tuple[list[str], list[str], Path]:
    """The README's serve and envoy-config commands, its sidecar.yaml (socket moved into tmp_path) and plugin."""
    [config] = [block for block in _blocks("yaml") if block.startswith("# sidecar.yaml")]
    written = yaml.safe_load(config)["listen"].removeprefix("unix:")
    sock = tmp_path / "run" / "extproc.sock"
    (tmp_path / "sidecar.yaml").write_text(config.replace(written, str(sock)))
    package = tmp_path / "mycompany"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plugins.py").write_text(_blocks("python")[0])
    [commands] = [block for block in _blocks("sh") if "sidecar serve" in block]
    serve, envoy_config = (shlex.split(line.split(">")[0].rstrip(" &")) for line in commands.splitlines()[:2])
    assert serve[:2] == ["sidecar", "serve"] and envoy_config[:2] == ["sidecar", "envoy-config"]
    return serve, envoy_config, sock


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "sidecar", *args[1:]]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_quick_start_points_envoy_at_the_socket_serve_listens_on(tmp_path: Path) -> None:
    serve, envoy_config, sock = _quick_start(tmp_path)
    alone = _run(envoy_config, tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert f"warning: nothing listens on unix:{sock}" in alone.stderr
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "sidecar", *serve[1:]], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: server.poll() is None and sock.exists() and health_status(sock) == "SERVING", 30, "serve")
        proc = _run(envoy_config, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr
        cluster = yaml.safe_load(proc.stdout)["static_resources"]["clusters"][0]
        [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["pipe"]["path"] == str(sock)
    finally:
        server.terminate()
        assert server.wait(30) == 0


def test_validate_warns_for_every_worker_socket_nobody_listens_on(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: unix:{tmp_path}/s.sock\nworkers: 2\nplugins: [header-stamp]\n")
    stale = tmp_path / "s-0.sock"
    stale.touch()  # a file that is not a socket: still nobody listening
    proc = _run(["sidecar", "envoy-config", "-c", str(config), "--validate"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "warning: nothing listens" in line]
    named = [line.split("unix:")[1].split(";")[0] for line in warned]
    assert named == [str(tmp_path / f"s-{i}.sock") for i in range(2)]
    without = _run(["sidecar", "envoy-config", "-c", str(config)], tmp_path)
    assert without.returncode == 0 and without.stderr == ""
