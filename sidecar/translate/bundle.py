"""`sidecar render --format eg`: the EG resources that run this sidecar inside an EG-managed Envoy pod.

The input resources come back (validated as EG would, loopback Backends refused) with these changes:

* a Backend annotated `envoy-sidecar/extproc: "true"` gets `unix` endpoints on the shared volume, one
  per sidecar worker socket (EG must run with `extensionApis.enableBackend: true`);
* an extProc entry using it with no `processingMode` gets the one the sidecar's plugin chain needs,
  and `allowModeOverride: true` (the sidecar narrows the mode per request); with no `failOpen`, the
  chain's own failure policy (`failOpen: true` on a fail_closed chain is refused); with no
  `backendSettings`, the health checks, ejection and retries that route around a failed worker;
* every Gateway's EnvoyProxy (the referenced one, else an unreferenced one with a filterOrder, which
  is the GatewayClass's, else a new `<gateway>-envoy-sidecar` the Gateway is pointed at) gets a
  strategic-merge `envoyDeployment.patch`: an emptyDir shared by Envoy and the sidecar container,
  plus the sidecar config from a ConfigMap, which is added too.

EG cannot pass per-route gRPC metadata to an ext_proc server, so every extProc entry runs the sidecar's
default chain; a chain annotation is refused rather than ignored.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.chains import Registry, describe_mode
from sidecar.config import SidecarConfig, load_config
from sidecar.errors import ConfigError
from sidecar.translate.backends import eg_backend_settings
from sidecar.translate.options import CHAIN_ANNOTATION, SIDECAR_ANNOTATION
from sidecar.translate.refs import gateway_envoy_proxy, unresolved_parameters_ref
from sidecar.translate.render import dump_documents
from sidecar.translate.resources import EG_API, Resource, ResourceSet, load_resources, parse_document
from sidecar.translate.rules import validate

__all__ = ["SOCKET_DIR", "render_bundle"]

SOCKET_DIR = "/var/run/envoy-sidecar"
_CONFIG_DIR = "/etc/envoy-sidecar"
_VOLUME = "envoy-sidecar-sockets"
_CONFIG_VOLUME = "envoy-sidecar-config"
_BODY_MODES = {
    "STREAMED": "Streamed",
    "BUFFERED": "Buffered",
    "BUFFERED_PARTIAL": "BufferedPartial",
    "FULL_DUPLEX_STREAMED": "FullDuplexStreamed",
}


def _is_sidecar(res: Resource) -> bool:
    return res.kind == "Backend" and str(res.annotations.get(SIDECAR_ANNOTATION, "")).lower() == "true"


def _eg_processing_mode(registry: Registry) -> dict[str, Any]:
    """The chain's ProcessingMode in EG's terms: a direction block present means its headers are sent."""
    mode = describe_mode(registry.default.mode)
    result: dict[str, Any] = {"allowModeOverride": True}
    for direction in ("request", "response"):
        body = mode[f"{direction}_body_mode"]
        if mode[f"{direction}_header_mode"] == "SEND" or body != "NONE":
            result[direction] = {"body": _BODY_MODES[body]} if body != "NONE" else {}
    return result


def _patch(image: str, workers: int, socket_path: str) -> dict[str, Any]:
    socket_mount = {"name": _VOLUME, "mountPath": SOCKET_DIR}
    return {
        "type": "StrategicMerge",
        "value": {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "envoy", "volumeMounts": [socket_mount]},
                            {
                                "name": "envoy-sidecar",
                                "image": image,
                                "args": [
                                    "serve",
                                    "-c",
                                    f"{_CONFIG_DIR}/sidecar.yaml",
                                    "--listen",
                                    f"unix:{socket_path}",
                                    "--workers",
                                    str(workers),
                                ],
                                "volumeMounts": [socket_mount, {"name": _CONFIG_VOLUME, "mountPath": _CONFIG_DIR}],
                            },
                        ],
                        "volumes": [
                            {"name": _VOLUME, "emptyDir": {}},
                            {"name": _CONFIG_VOLUME, "configMap": {"name": _CONFIG_VOLUME}},
                        ],
                    }
                }
            }
        },
    }


def render_bundle(paths: Sequence[str | os.PathLike[str]], sidecar_config: Path, *, image: str) -> str:
    resources = load_resources(paths)
    validate(resources, strict_eg=True)
    loaded = load_config(sidecar_config)
    registry = Registry.from_specs(loaded.chains)
    socket_path = f"{SOCKET_DIR}/extproc.sock"
    sockets = SidecarConfig(listen=f"unix:{socket_path}", workers=loaded.workers).socket_paths()
    sidecars = {(r.namespace, r.name) for r in resources if _is_sidecar(r)}
    if not sidecars:
        raise ConfigError(
            f'no Backend is annotated {SIDECAR_ANNOTATION}: "true"; mark the Backend your '
            "extProc entries use for this sidecar"
        )
    out: list[dict[str, Any]] = []
    for res in resources:
        doc = copy.deepcopy(res.data)
        if _is_sidecar(res):
            doc["spec"]["endpoints"] = [{"unix": {"path": str(s)}} for s in sockets]
        elif res.kind == "EnvoyExtensionPolicy":
            _fill_modes(res, doc, sidecars, registry, loaded.workers)
        out.append(doc)
    _add_envoy_proxies(resources, out, _patch(image, loaded.workers, socket_path), sidecar_config.read_text())
    validate(ResourceSet(parse_document(d, "(bundle)") for d in out), strict_eg=True)
    return dump_documents(out)


def _fill_modes(
    res: Resource, doc: dict[str, Any], sidecars: set[tuple[str, str]], registry: Registry, workers: int
) -> None:
    for index, ext in enumerate(doc["spec"].get("extProc") or []):
        refs = ext["backendRefs"]
        targets = {
            (ref.get("namespace", res.namespace), ref["name"])
            for ref in refs
            if ref.get("group") == EG_API and ref.get("kind") == "Backend"
        }
        uses_sidecar = bool(targets & sidecars)
        if not uses_sidecar:
            continue
        chain = res.annotations.get(CHAIN_ANNOTATION)
        if chain is not None and chain != registry.default.name:
            raise res.error(
                f"metadata.annotations.{CHAIN_ANNOTATION}",
                "EG cannot tell the sidecar which chain "
                f"to run; only the default chain ({registry.default.name!r}) works under EG",
            )
        if ext.get("failOpen") and not registry.default.fail_open:
            raise res.error(
                f"spec.extProc[{index}].failOpen",
                f"true would let requests through unprocessed when sidecar chain {registry.default.name!r} "
                "(on_error: fail_closed) times out or the sidecar is unreachable; set on_error: fail_open on "
                "the chain, or drop failOpen",
            )
        ext.setdefault("failOpen", registry.default.fail_open)
        ext.setdefault("backendSettings", eg_backend_settings(workers))
        if "processingMode" not in ext:
            ext["processingMode"] = _eg_processing_mode(registry)
        elif not ext["processingMode"].get("allowModeOverride"):
            raise res.error(
                f"spec.extProc[{index}].processingMode.allowModeOverride",
                "expected true when the backend is envoy-sidecar (it narrows the mode per request)",
            )


def _add_envoy_proxies(resources: ResourceSet, out: list[dict[str, Any]], patch: dict[str, Any], config: str) -> None:
    by_key = {(d["kind"], d["metadata"].get("namespace", "default"), d["metadata"]["name"]): d for d in out}
    namespaces: set[str] = set()
    for gateway in resources.of("Gateway"):
        namespaces.add(gateway.namespace)
        doc = by_key[gateway.key]
        ref = (doc["spec"].get("infrastructure") or {}).get("parametersRef")
        proxy: dict[str, Any] | None
        shared = gateway_envoy_proxy(resources, gateway) if ref is None else None
        if shared is not None:
            proxy = by_key[shared.key]  # the GatewayClass-level one (see refs.gateway_envoy_proxy)
        elif ref is None:
            name = f"{gateway.name}-envoy-sidecar"
            doc["spec"].setdefault("infrastructure", {})["parametersRef"] = {
                "group": EG_API,
                "kind": "EnvoyProxy",
                "name": name,
            }
            proxy = {
                "apiVersion": f"{EG_API}/v1alpha1",
                "kind": "EnvoyProxy",
                "metadata": {"name": name, "namespace": gateway.namespace},
                "spec": {},
            }
            out.append(proxy)
            by_key[("EnvoyProxy", gateway.namespace, name)] = proxy
        else:
            proxy = by_key.get(("EnvoyProxy", gateway.namespace, ref["name"]))
            unresolved = unresolved_parameters_ref(resources, gateway)
            if proxy is None or unresolved is not None:
                # EG would run this Gateway's Envoy without the sidecar container the patch adds.
                raise gateway.error(
                    "spec.infrastructure.parametersRef",
                    f"{unresolved}: the sidecar container goes into the referenced EnvoyProxy; add it, "
                    "or drop the reference to have one made",
                )
        deployment = (
            proxy["spec"]
            .setdefault("provider", {"type": "Kubernetes"})
            .setdefault("kubernetes", {})
            .setdefault("envoyDeployment", {})
        )
        if deployment.get("patch") not in (None, patch):
            raise ConfigError(
                f"EnvoyProxy {gateway.namespace}/{proxy['metadata']['name']}: "
                "spec.provider.kubernetes.envoyDeployment.patch: already set; merge the sidecar "
                "container and volumes into it by hand"
            )
        deployment["patch"] = patch
    for namespace in sorted(namespaces):
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": _CONFIG_VOLUME, "namespace": namespace},
                "data": {"sidecar.yaml": config},
            }
        )
