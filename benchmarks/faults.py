"""Faults under load through a real Envoy: a worker killed, a worker stalled, the pod shut down in order.

Envoy (1 worker thread) runs the bootstrap `sidecar envoy-config` writes, routed to a direct-response
listener in the same Envoy (so the upstream is never the bottleneck), in front of `sidecar serve
--workers 2` with a plugin that adds one header each way. The script first measures the stack's
throughput flat out, then runs each scenario at half of it with a fresh stack:

* kill:     SIGKILL one worker (the supervisor restarts it). Failures should not exceed the requests in
            flight at the kill, and none should start after it.
* stall:    SIGSTOP one worker for 3 s, then SIGCONT. No request that starts more than 1 s into the stall
            should fail.
* shutdown: Envoy drains first (health check failed, its listener drained; the upstream listener stays),
            load stops a second later as a load balancer would, Envoy exits, then the sidecar gets
            SIGTERM. Nothing should fail.

    python benchmarks/faults.py [--scenario kill|stall|shutdown]... [--seconds 9] [--rate N]

Loopback only; every run is bounded by --seconds and a request cap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.chains import Registry  # noqa: E402
from sidecar.config import load_config  # noqa: E402
from sidecar.stack.envoy import Envoy  # noqa: E402
from sidecar.stack.sidecar import SidecarProcess  # noqa: E402
from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap  # noqa: E402
from tests.support.load import Report, children, direct_response_listener, run_load  # noqa: E402
from tests.support.testplugins import TP  # noqa: E402

SCENARIOS = ("kill", "stall", "shutdown")
FAULT_AT = 3.0
STALL_SECONDS = 3.0
MAX_REQUESTS = 200_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def admin_post(envoy: Envoy, path: str) -> None:
    request = urllib.request.Request(envoy.admin_url + path, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def error_lines(log: str) -> list[str]:
    """Lines of the sidecar's JSON log at level error or above, and any line that is not JSON (a traceback)."""
    found = []
    for line in filter(str.strip, log.splitlines()):
        try:
            level = json.loads(line).get("level")
        except (ValueError, AttributeError):
            level = "not json"
        if level in ("error", "critical", "not json"):
            found.append(line)
    return found


def with_backend(bootstrap: dict[str, Any], backend_port: int) -> dict[str, Any]:
    """Add a `backend` listener answering 200 directly: the upstream the `main` listener routes to."""
    bootstrap["static_resources"]["listeners"].append(direct_response_listener("backend", backend_port))
    return bootstrap


class Stack:
    """Envoy + `sidecar serve --workers N`, from the config in `directory`."""

    def __init__(self, directory: Path, workers: int, message_timeout: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "sidecar.yaml"
        self.config_path.write_text(
            f"listen: unix:{directory}/extproc.sock\nworkers: {workers}\nmessage_timeout: {message_timeout}\n"
            f"log_format: json\nplugins: ['{TP}AddHeaders']\n"
        )
        config = load_config(self.config_path)
        registry = Registry.from_specs(config.chains)
        backend_port = free_port()
        options = BootstrapOptions(listen_port=0, upstream=("127.0.0.1", backend_port))
        self.bootstrap = with_backend(build_bootstrap(registry, config, options), backend_port)
        self.sockets = config.socket_paths()
        self.sidecar = SidecarProcess(["-c", str(self.config_path)], self.sockets, log_path=directory / "sidecar.log")
        self.envoy = Envoy(self.bootstrap, workdir=directory / "envoy", concurrency=1)

    def start(self) -> tuple[str, int]:
        self.sidecar.start()
        self.envoy.start()
        self.wait_healthy()
        return self.envoy.listener_address("main")

    def healthy_endpoints(self) -> int:
        lines = self.envoy.admin("/clusters").splitlines()
        return sum(1 for line in lines if line.startswith("envoy-sidecar::") and line.endswith("health_flags::healthy"))

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.healthy_endpoints() < len(self.sockets):
            if time.monotonic() > deadline:
                raise RuntimeError("the sidecar's endpoints did not all become healthy in Envoy")
            time.sleep(0.05)

    def workers(self) -> list[int]:
        return children(self.sidecar.pid)

    def close(self) -> None:
        self.envoy.close()
        self.sidecar.close()


Tick = Callable[[float], None]


def load(address: tuple[str, int], seconds: float, rate: float | None, on_tick: Tick | None) -> Report:
    return asyncio.run(
        run_load(*address, seconds=seconds, rate=rate, connections=16, max_requests=MAX_REQUESTS, on_tick=on_tick)
    )


def scenario_kill(stack: Stack, address: tuple[str, int], rate: float, seconds: float) -> list[str]:
    victim = stack.workers()[0]
    fault: list[float] = []

    def tick(elapsed: float) -> None:
        if not fault and elapsed >= FAULT_AT:
            os.kill(victim, signal.SIGKILL)
            fault.append(time.monotonic())

    report = load(address, seconds, rate, tick)
    at = fault[0]
    return [
        report.summary(),
        f"in flight at the kill: {report.in_flight(at)}; failed: {len(report.failed)}; "
        f"failed that started after the kill: {len(report.failed_between(at))}",
    ]


def scenario_stall(stack: Stack, address: tuple[str, int], rate: float, seconds: float) -> list[str]:
    victim = stack.workers()[0]
    marks: list[float] = []

    def tick(elapsed: float) -> None:
        if not marks and elapsed >= FAULT_AT:
            os.kill(victim, signal.SIGSTOP)
            marks.append(time.monotonic())
        elif len(marks) == 1 and elapsed >= FAULT_AT + STALL_SECONDS:
            os.kill(victim, signal.SIGCONT)
            marks.append(time.monotonic())

    try:
        report = load(address, seconds, rate, tick)
    finally:
        os.kill(victim, signal.SIGCONT)
    stopped = marks[0]
    late = report.failed_between(stopped + 1.0)
    return [
        report.summary(),
        f"in flight at SIGSTOP: {report.in_flight(stopped)}; failed: {len(report.failed)}; "
        f"failed in the stall's first second: {len(report.failed_between(stopped, stopped + 1.0))}; "
        f"failed that started later: {len(late)}",
    ]


def scenario_shutdown(stack: Stack, address: tuple[str, int], rate: float, seconds: float) -> list[str]:
    drained: list[float] = []

    def tick(elapsed: float) -> None:
        if not drained and elapsed >= FAULT_AT:
            # What Kubernetes does first: Envoy's preStop/SIGTERM starts the drain (readiness fails, listeners
            # drain gracefully); the endpoint leaves the load balancer a moment later.
            admin_post(stack.envoy, "/healthcheck/fail")
            admin_post(stack.envoy, "/drain_listeners?graceful&inboundonly")
            drained.append(time.monotonic())

    report = load(address, min(seconds, FAULT_AT + 1.0), rate, tick)
    stack.envoy.stop()
    stack.sidecar.signal(signal.SIGTERM)
    code = stack.sidecar.wait(30)
    errors = error_lines(stack.sidecar.logs())
    return [
        report.summary(),
        f"in flight when the drain began: {report.in_flight(drained[0])}; failed: {len(report.failed)}; "
        f"sidecar exit code {code}; error lines in its log: {len(errors)}",
    ]


RUNNERS = {"kill": scenario_kill, "stall": scenario_stall, "shutdown": scenario_shutdown}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
    parser.add_argument("--seconds", type=float, default=9.0, help="load per scenario (default %(default)s)")
    parser.add_argument("--rate", type=float, help="requests/s (default: half the measured maximum)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--message-timeout", type=float, default=0.5)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory(prefix="sidecar-faults-") as tmp:
        rate = args.rate
        if rate is None:
            stack = Stack(Path(tmp) / "max", args.workers, args.message_timeout)
            try:
                address = stack.start()
                load(address, 1.0, None, None)  # warm-up
                top = load(address, 4.0, None, None)
            finally:
                stack.close()
            rate = round(top.rate / 2)
            print(f"maximum: {top.rate:.0f} req/s ({top.summary()}); running at {rate} req/s", flush=True)
        for name in args.scenario or SCENARIOS:
            stack = Stack(Path(tmp) / name, args.workers, args.message_timeout)
            try:
                address = stack.start()
                lines = RUNNERS[name](stack, address, rate, args.seconds)
            finally:
                stack.close()
            print(f"{name}:", *lines, sep="\n  ", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
