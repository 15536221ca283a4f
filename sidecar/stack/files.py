"""`sidecar up -f FILES`: Envoy Gateway resources run locally, reloaded when the files change.

Everything is checked before anything starts: the resources are loaded, validated and rendered (Wasm
modules fetched and verified on the way), extProc backends that are not this sidecar must accept a
connection (ip and unix endpoints; Envoy resolves FQDNs itself), and Envoy must accept the config
(`--mode validate`). Then the sidecar starts (when a Backend is the sidecar or a sidecar config is
given), then Envoy.

Reload: the input files are polled; a change re-renders and validates the config and hot-restarts
Envoy (same base id, next epoch): the new process takes over the listening sockets and the old one
drains, so in-flight requests finish. A bad edit is reported and the running config stays.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.chains import Registry
from sidecar.config import SidecarConfig, load_config
from sidecar.errors import ConfigError, SidecarError
from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.stack.sidecar import SidecarProcess
from sidecar.translate.options import SIDECAR_ANNOTATION, RenderOptions, SidecarLink
from sidecar.translate.refs import backend_ref_target
from sidecar.translate.render import translate
from sidecar.translate.resources import ResourceSet, load_resources, resource_files
from sidecar.translate.wasmsource import fetch_module

__all__ = ["Stack", "StackOptions", "check_ext_proc_reachable", "run_stack"]

_POLL_SECONDS = 0.5
_PARENT_SHUTDOWN_SECONDS = 30  # Envoy's --parent-shutdown-time-s (runtime/envoy.py)
_CONNECT_TIMEOUT = 1.0


@dataclass(frozen=True)
class StackOptions:
    files: tuple[Path, ...]
    sidecar_config: Path | None = None
    workers: int = 1
    dns_resolver: tuple[str, int] | None = None
    listen_address: str = "127.0.0.1"


def _reachable(endpoint: dict[str, Any]) -> str | None:
    """None if a connection succeeds (or cannot be tried here), else why not."""
    target: str | tuple[str, int]
    if endpoint.get("unix"):
        family, target = socket.AF_UNIX, endpoint["unix"]["path"]
    elif endpoint.get("ip"):
        ip = endpoint["ip"]
        family, target = (socket.AF_INET6 if ":" in ip["address"] else socket.AF_INET), (ip["address"], ip["port"])
    else:
        return None  # Envoy resolves FQDNs itself (possibly with --dns-resolver); its view is what counts
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(_CONNECT_TIMEOUT)
            sock.connect(target)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_ext_proc_reachable(resources: ResourceSet, link: SidecarLink | None) -> None:
    """Every extProc backend (other than this sidecar, which is started here) must accept a connection."""
    for policy in resources.of("EnvoyExtensionPolicy"):
        for index, ext in enumerate(policy.spec.get("extProc") or []):
            for i, ref in enumerate(ext["backendRefs"]):
                path = f"spec.extProc[{index}].backendRefs[{i}]"
                target = backend_ref_target(resources, policy, ref, path)
                if target.resource.kind != "Backend" or (link is not None and link.is_sidecar(target.resource)):
                    continue
                for e, endpoint in enumerate(target.resource.spec["endpoints"]):
                    why = _reachable(endpoint)
                    if why is not None:
                        raise policy.error(
                            path, f"extProc backend {target.resource.name} endpoint {e} is not reachable: {why}"
                        )


def _wants_sidecar(resources: ResourceSet) -> bool:
    return any(str(b.annotations.get(SIDECAR_ANNOTATION, "")).lower() == "true" for b in resources.of("Backend"))


class Stack:
    """The sidecar (optional) and Envoy for a set of resource files; `reload()` hot-restarts Envoy."""

    def __init__(self, options: StackOptions, workdir: Path, say: Callable[[str], None] = lambda _: None) -> None:
        self.options = options
        self.workdir = workdir
        self.say = say
        self.sidecar: SidecarProcess | None = None
        self.link: SidecarLink | None = None
        self.envoy: Envoy | None = None
        self._generation = 0
        self._retired: list[tuple[Envoy, threading.Thread]] = []

    def _fetch(self, code: dict[str, Any], pull_secrets: dict[str, dict[str, Any]]) -> dict[str, Any]:
        # The one Wasm cache (`sidecar wasm pull/ls/gc`, `render`): a module pulled once is not pulled again.
        return fetch_module(code, None, pull_secrets=pull_secrets)

    def _build(self) -> tuple[ResourceSet, dict[str, Any]]:
        resources = load_resources(self.options.files)
        bootstrap = translate(
            resources,
            RenderOptions(
                listen_address=self.options.listen_address,
                dns_resolver=self.options.dns_resolver,
                sidecar=self.link,
                fetch_module=self._fetch,
            ),
        )
        check_ext_proc_reachable(resources, self.link)
        validate_bootstrap(bootstrap)
        return resources, bootstrap

    def start(self) -> None:
        resources = load_resources(self.options.files)
        config_path = self.options.sidecar_config
        if config_path is None and _wants_sidecar(resources):
            from sidecar.stack.up import demo_config_path

            config_path = demo_config_path()
        sidecar_args: list[str] = []
        if config_path is not None:
            loaded = load_config(config_path)
            registry = Registry.from_specs(loaded.chains)  # bad plugins fail before anything starts
            socket_path = self.workdir / "extproc.sock"
            config = SidecarConfig(chains=loaded.chains, listen=f"unix:{socket_path}", workers=self.options.workers)
            self.link = SidecarLink(registry, tuple(config.socket_paths()), loaded.message_timeout)
            sidecar_args = [
                "-c",
                str(config_path),
                "--listen",
                f"unix:{socket_path}",
                "--workers",
                str(self.options.workers),
                "--log-format",
                "text",
            ]
        _, bootstrap = self._build()
        if self.link is not None:
            self.sidecar = SidecarProcess(sidecar_args, self.link.sockets, log_path=self.workdir / "sidecar.log")
            self.sidecar.start()
            self.say(f"sidecar        {self.link.sockets[0]} (chains: {', '.join(sorted(self.link.registry.chains))})")
        self.envoy = Envoy(bootstrap, workdir=self.workdir / "envoy-0")
        self.envoy.start()

    def urls(self) -> list[tuple[str, str, list[str]]]:
        """(listener name, URL, hostnames its routes serve) for every Envoy listener."""
        assert self.envoy is not None
        result = []
        for listener in self.envoy.bootstrap["static_resources"]["listeners"]:
            host, port = self.envoy.listener_address(listener["name"])
            chain = listener["filter_chains"][0]
            scheme = "https" if chain.get("transport_socket") else "http"
            hostnames = sorted(
                {
                    domain
                    for fc in listener["filter_chains"]
                    for f in fc["filters"]
                    for vh in f["typed_config"]["route_config"].get("virtual_hosts", [])
                    for domain in vh["domains"]
                    if domain != "*"
                }
            )
            result.append((listener["name"], f"{scheme}://{host}:{port}", hostnames))
        return result

    def reload(self) -> None:
        """Re-render and hot-restart Envoy; on any error the running Envoy is kept and the error raised."""
        assert self.envoy is not None
        _, bootstrap = self._build()
        self._generation += 1
        old = self.envoy
        new = Envoy(bootstrap, workdir=self.workdir / f"envoy-{self._generation}", hot_restart_of=old)
        new.start()
        self.envoy = new
        reaper = threading.Thread(target=_reap, args=(old,), daemon=True)
        reaper.start()
        self._retired.append((old, reaper))

    def running_problem(self) -> str | None:
        if self.envoy is not None and not self.envoy.running:
            return f"Envoy exited: {self.envoy.logs().strip().splitlines()[-1:]}"
        if self.sidecar is not None and self.sidecar.proc is not None and self.sidecar.proc.poll() is not None:
            return f"the sidecar exited: {self.sidecar.last_log_line()}"
        return None

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.close()
        for old, reaper in self._retired:
            old.stop()  # stopping everything: no need to wait for a replaced Envoy's drain
            reaper.join(10)
        if self.sidecar is not None:
            self.sidecar.close()


def _reap(old: Envoy) -> None:
    """Let a replaced Envoy drain and exit on its own (it finishes in-flight requests), then clean up."""
    deadline = time.monotonic() + _PARENT_SHUTDOWN_SECONDS + 5
    while old.running and time.monotonic() < deadline:
        time.sleep(0.2)
    old.close()


def _snapshot(files: Sequence[Path]) -> dict[str, float]:
    """Modification times of every input file (directories re-listed, so added files count)."""
    try:
        return {str(p): p.stat().st_mtime_ns for p in resource_files(files)}
    except (ConfigError, OSError):
        return {}


def run_stack(options: StackOptions, stop: threading.Event) -> int:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="sidecar-up-") as tmp:
        stack = Stack(options, Path(tmp), say)
        try:
            seen = _snapshot(options.files)
            stack.start()
            for name, url, hostnames in stack.urls():
                say(f"listener {name}  {url}/")
                for hostname in hostnames:
                    say(f"  curl -si -H 'host: {hostname}' {url}/")
            say(f"\nwatching {', '.join(map(str, options.files))}  -  logs: {tmp}  -  Ctrl-C stops everything")
            while not stop.wait(_POLL_SECONDS):
                problem = stack.running_problem()
                if problem is not None:
                    raise SidecarError(problem)
                now = _snapshot(options.files)
                if now != seen:
                    seen = now
                    try:
                        stack.reload()
                    except SidecarError as exc:
                        say(f"reload failed, keeping the running config: {exc}")
                    else:
                        say("reloaded: " + ", ".join(f"{name} {url}/" for name, url, _ in stack.urls()))
            say("\nstopping")
        finally:
            stack.close()
    return 0
