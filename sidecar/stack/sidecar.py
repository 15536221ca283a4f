"""Run `sidecar serve` as a child process and wait until every worker answers gRPC health checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.errors import SidecarError

__all__ = ["SidecarProcess", "health_status"]


def health_status(socket_path: Path | str, service: str = "", timeout: float = 1.0) -> str:
    """The gRPC health status name a socket answers for `service`, or 'UNREACHABLE'."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return "NOT_FOUND" if exc.code() == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class SidecarProcess:
    """`python -m sidecar serve ARGS`, output captured to a log file."""

    def __init__(self, args: Sequence[str], sockets: Sequence[Path], *, log_path: Path | None = None) -> None:
        self.args = list(args)
        self.sockets = list(sockets)
        self._tmp = None if log_path else tempfile.TemporaryDirectory(prefix="sidecar-log-")
        self.log_path = log_path or Path(self._tmp.name) / "sidecar.log"  # type: ignore[union-attr]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> SidecarProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.sockets)
        while pending:
            if self.proc is not None and self.proc.poll() is not None:
                raise SidecarError(f"sidecar exited with code {self.proc.returncode}: {self.last_log_line()}")
            if time.monotonic() > deadline:
                raise SidecarError(f"sidecar not serving on {pending[0]} within {timeout:.0f}s: {self.last_log_line()}")
            if pending[0].exists() and health_status(pending[0]) == "SERVING":
                pending.pop(0)
            else:
                time.sleep(0.05)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def last_log_line(self) -> str:
        lines = [line for line in self.logs().splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
