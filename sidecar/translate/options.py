"""What the translator needs beyond the resources: where to listen, how to resolve DNS, the local sidecar."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.chains import Registry
from sidecar.translate.resources import Resource

__all__ = ["CHAIN_ANNOTATION", "SIDECAR_ANNOTATION", "RenderOptions", "SidecarLink"]

# On a Backend: "this Backend is the envoy-sidecar ext_proc server" (its endpoints become the sidecar's
# worker sockets and extProc entries using it get the plugin chain's processing mode by default).
SIDECAR_ANNOTATION = "envoy-sidecar/extproc"
# On an EnvoyExtensionPolicy: which sidecar chain its extProc entries run (default: the default chain).
CHAIN_ANNOTATION = "envoy-sidecar/chain"
# On a Backend with one fqdn endpoint: "logical" makes its cluster LOGICAL_DNS (one logical host whose
# connections survive DNS answers rotating, as for large web services); EG itself always uses STRICT_DNS.
DNS_ANNOTATION = "envoy-sidecar/dns"


@dataclass(frozen=True)
class SidecarLink:
    """The local ext_proc sidecar: its plugin registry and the sockets its workers listen on."""

    registry: Registry
    sockets: tuple[Path, ...]
    message_timeout: float = 0.5  # the sidecar config's, used when a policy sets no messageTimeout

    def is_sidecar(self, backend: Resource) -> bool:
        if backend.kind != "Backend":
            return False
        if str(backend.annotations.get(SIDECAR_ANNOTATION, "")).lower() == "true":
            return True
        paths = {str(s) for s in self.sockets}
        unix = [e["unix"]["path"] for e in backend.spec["endpoints"] if e.get("unix")]
        return bool(unix) and all(p in paths for p in unix)


@dataclass(frozen=True)
class RenderOptions:
    # EG binds 0.0.0.0 and shifts privileged ports by 10000 (80 -> 10080); `sidecar up` binds loopback.
    listen_address: str = "0.0.0.0"
    port_shift: int = 10000
    ephemeral_ports: bool = False  # bind every listener on port 0 (tests)
    dns_resolver: tuple[str, int] | None = None  # c-ares resolver for FQDN Backends
    sidecar: SidecarLink | None = None
    # (wasm `code` spec, {pull Secret name: Secret manifest}) -> Envoy AsyncDataSource dict; see wasmsource.
    fetch_module: Callable[[dict[str, Any], dict[str, dict[str, Any]]], dict[str, Any]] | None = None

    def listener_port(self, port: int) -> int:
        if self.ephemeral_ports:
            return 0
        return port + self.port_shift if port < 1024 else port
