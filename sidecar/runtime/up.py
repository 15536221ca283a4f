"""`sidecar up`: real Envoy + the ext_proc sidecar + (optionally) the echo backend, on localhost."""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path

from sidecar.config import SidecarConfig, load_config
from sidecar.errors import SidecarError
from sidecar.registry import Registry
from sidecar.runtime.demo import EchoBackend
from sidecar.runtime.envoy import Envoy
from sidecar.runtime.extproc import SidecarProcess
from sidecar.translate.bootstrap import LISTENER_NAME, BootstrapOptions, build_bootstrap

__all__ = ["demo_config_path", "run_up"]

_POLL_SECONDS = 0.5


def demo_config_path() -> Path:
    return Path(str(resources.files("sidecar.runtime") / "demo.yaml"))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_up(config_path: Path | None, *, port: int, upstream: tuple[str, int] | None, workers: int) -> int:
    config_path = config_path or demo_config_path()
    loaded = load_config(config_path)
    registry = Registry.from_specs(loaded.chains)  # fail on bad plugins before starting anything
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="sidecar-up-") as tmp:
        workdir = Path(tmp)
        socket = workdir / "extproc.sock"
        config = SidecarConfig(
            chains=loaded.chains, listen=f"unix:{socket}", workers=workers,
            message_timeout=loaded.message_timeout, source=loaded.source,
        )  # fmt: skip
        backend = None
        if upstream is None:
            backend = EchoBackend().start()
            upstream = backend.address
            _say(f"echo backend   http://{upstream[0]}:{upstream[1]}/")
        sidecar = SidecarProcess(
            ["-c", str(config_path), "--listen", f"unix:{socket}", "--workers", str(workers), "--log-format", "text"],
            config.socket_paths(),
            log_path=workdir / "sidecar.log",
        )
        envoy = Envoy(
            build_bootstrap(registry, config, BootstrapOptions(listen_port=port, upstream=upstream)),
            workdir=workdir / "envoy",
        )
        try:
            sidecar.start()
            _say(f"sidecar        {socket} ({workers} worker{'s' if workers > 1 else ''}, chains: "
                 f"{', '.join(sorted(registry.chains))})")  # fmt: skip
            envoy.start()
            host, bound = envoy.listener_address(LISTENER_NAME)
            url = f"http://{host}:{bound}"
            _say(f"envoy          {url}/  (admin {envoy.admin_url})")
            _say("\nTry it:\n")
            _say(f"  curl -si {url}/hello")
            _say(f"  curl -si {url}/login -H 'content-type: application/json' "
                 "-d '{\"user\": \"ada\", \"password\": \"hunter2\"}'")  # fmt: skip
            _say("\nlogs: " + str(workdir) + "  -  Ctrl-C stops everything")
            while not stop.wait(_POLL_SECONDS):
                if not envoy.running:
                    raise SidecarError(f"Envoy exited: {envoy.logs().strip().splitlines()[-1:]}")
                if sidecar.proc is not None and sidecar.proc.poll() is not None:
                    raise SidecarError(f"the sidecar exited: {sidecar.last_log_line()}")
            _say("\nstopping")
        finally:
            envoy.close()
            sidecar.close()
            if backend is not None:
                backend.stop()
    return 0
