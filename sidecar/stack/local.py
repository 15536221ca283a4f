"""Envoy + the ext_proc sidecar (+ the demo backend) as one local stack, for `sidecar up` and the tests; or, with
`in_process`, Envoy alone running the same chains in its in-process module."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when started: `sidecar.testing` (a pytest plugin) imports this module
    from sidecar.chains import Registry
    from sidecar.stack.demo import EchoBackend
    from sidecar.stack.envoy import Envoy
    from sidecar.stack.sidecar import SidecarProcess

__all__ = ["LocalEnvoy"]


class LocalEnvoy:
    """Real Envoy + `sidecar serve` (+ the echo backend unless `upstream` is given), all on loopback.

    What `sidecar up` runs, and what the test harness (`sidecar.testing.EnvoyHarness`) starts.
    """

    def __init__(
        self,
        *,
        config: str | Path | None = None,
        plugins: Sequence[str] = (),
        upstream: tuple[str, int] | None = None,
        routes: Sequence[str] = (),
        port: int = 0,
        workers: int = 1,
        serve_args: Sequence[str] = (),
        workdir: Path | None = None,
        bootstrap_hook: Callable[[dict[str, Any]], None] | None = None,
        in_process: bool = False,
    ) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="sidecar-harness-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.config = config
        self.plugins = list(plugins)
        self.upstream = upstream
        self.routes = list(routes)
        self.port = port
        self.workers = workers
        self.serve_args = list(serve_args)
        #: Called with the generated bootstrap before Envoy starts, to add what a test needs (access logs...).
        self.bootstrap_hook = bootstrap_hook
        #: Run the chains inside Envoy (the dynamic-module filter) instead of in a `sidecar serve` process.
        self.in_process = in_process
        self.backend: EchoBackend | None = None
        self.sidecar: SidecarProcess | None = None
        self.envoy: Envoy | None = None
        self.url = ""
        self.bootstrap: dict[str, Any] = {}
        self.sockets: list[Path] = []
        self.registry: Registry | None = None

    def _source_args(self) -> list[str]:
        args = ["-c", str(self.config)] if self.config else []
        for plugin in self.plugins:
            args += ["--plugin", plugin]
        return args

    def start(self) -> LocalEnvoy:
        from sidecar.chains import load_sidecar
        from sidecar.stack.demo import EchoBackend
        from sidecar.stack.envoy import Envoy
        from sidecar.stack.sidecar import SidecarProcess
        from sidecar.translate.bootstrap import LISTENER_NAME, BootstrapOptions, build_bootstrap, parse_route

        socket = self.workdir / "sock" / "extproc.sock"
        listen = f"unix:{socket}"
        config, registry = load_sidecar(self.config, self.plugins, listen=listen, workers=self.workers)
        if self.upstream is None:
            self.backend = EchoBackend().start()
            self.upstream = self.backend.address
        routes = tuple(parse_route(r) for r in self.routes) if self.routes else BootstrapOptions().routes
        options = BootstrapOptions(listen_port=self.port, upstream=self.upstream, routes=routes)
        env: dict[str, str] = {}
        if self.in_process:
            from sidecar.inprocess.module import envoy_environment
            from sidecar.stack.inprocess import inprocess_bootstrap

            self.bootstrap = inprocess_bootstrap(registry, config, self._inprocess_config(), options)
            env = envoy_environment()
        else:
            self.bootstrap = build_bootstrap(registry, config, options)
        if self.bootstrap_hook is not None:
            self.bootstrap_hook(self.bootstrap)
        if not self.in_process:
            self.sidecar = SidecarProcess(
                [*self._source_args(), "--listen", listen, "--workers", str(self.workers), *self.serve_args],
                config.socket_paths(),
                log_path=self.workdir / "sidecar.log",
            ).start()
        self.registry = registry
        self.envoy = Envoy(self.bootstrap, workdir=self.workdir / "envoy", env=env).start()
        host, port = self.envoy.listener_address(LISTENER_NAME)
        self.url = f"http://{host}:{port}"
        self.sockets = config.socket_paths()
        return self

    def _inprocess_config(self) -> Path:
        """The config file Envoy's module loads: the given one, or one written for `plugins` alone."""
        from sidecar.errors import ConfigError

        if self.config and self.plugins:
            raise ConfigError("in-process: give the plugins in the config file or as plugins=, not both")
        if self.config:
            return Path(self.config).resolve()
        path = self.workdir / "sidecar-inprocess.yaml"
        uses = ", ".join(json.dumps(plugin) for plugin in self.plugins)
        path.write_text(f"chains:\n  default:\n    plugins: [{uses}]\n")
        return path.resolve()

    def running_problem(self) -> str | None:
        """Why the stack is no longer whole (a process exited), or None."""
        if self.envoy is not None and not self.envoy.running:
            return f"Envoy exited: {self.envoy.last_log_line()}"
        if self.sidecar is not None and self.sidecar.proc is not None and self.sidecar.proc.poll() is not None:
            return f"the sidecar exited: {self.sidecar.last_log_line()}"
        return None

    def logs(self) -> str:
        parts = []
        if self.sidecar is not None:
            parts.append("---- sidecar ----\n" + self.sidecar.logs())
        if self.envoy is not None:
            parts.append("---- envoy ----\n" + self.envoy.logs())
        return "\n".join(parts)

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.close()
        if self.sidecar is not None:
            self.sidecar.close()
        if self.backend is not None:
            self.backend.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalEnvoy:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
