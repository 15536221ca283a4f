"""`sidecar up`: real Envoy + the ext_proc sidecar + (optionally) the echo backend, on localhost."""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path

from sidecar.errors import SidecarError
from sidecar.stack.local import LocalEnvoy

__all__ = ["demo_config_path", "run_up"]

_POLL_SECONDS = 0.5


def demo_config_path() -> Path:
    return Path(str(resources.files("sidecar.stack") / "demo.yaml"))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_up(
    config_path: Path | None, *, port: int, upstream: tuple[str, int] | None, workers: int, in_process: bool = False
) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="sidecar-up-") as tmp:
        stack = LocalEnvoy(
            config=config_path or demo_config_path(),
            upstream=upstream,
            port=port,
            workers=workers,
            serve_args=["--log-format", "text"],
            workdir=Path(tmp),
            in_process=in_process,
        )
        try:
            stack.start()
            if stack.backend is not None:
                host, bound = stack.backend.address
                _say(f"echo backend   http://{host}:{bound}/")
            assert stack.registry is not None and stack.envoy is not None
            chains = ", ".join(sorted(stack.registry.chains))
            if in_process:
                _say(f"sidecar        in-process, inside Envoy (chains: {chains})")
            else:
                plural = "s" if workers > 1 else ""
                _say(f"sidecar        {stack.sockets[0].parent} ({workers} worker{plural}, chains: {chains})")
            _say(f"envoy          {stack.url}/  (admin {stack.envoy.admin_url})")
            _say("\nTry it:\n")
            _say(f"  curl -si {stack.url}/hello")
            _say(
                f"  curl -si {stack.url}/login -H 'content-type: application/json' "
                '-d \'{"user": "ada", "password": "hunter2"}\''
            )
            _say(f"\nlogs: {tmp}  -  Ctrl-C stops everything")
            while not stop.wait(_POLL_SECONDS):
                problem = stack.running_problem()
                if problem is not None:
                    raise SidecarError(problem)
            _say("\nstopping")
        finally:
            stack.close()
    return 0
