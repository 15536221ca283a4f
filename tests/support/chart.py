"""Helpers over the chart as rendered by a real helm: containers, command-line flags, the standalone
bootstrap, and the declaring plugin whose grants the chart hands to the sidecar."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.support.helm import CHART, Render

CI = CHART / "ci"


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def eg_pod(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(pod settings, envoy container settings, init containers) of the EnvoyProxy's deployment."""
    dep = one(docs, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    return dep["pod"], dep["container"], dep.get("initContainers", [])


def arg(args: list[str], flag: str) -> str:
    """The value of `flag` in a command line, given as `FLAG VALUE` or `FLAG=VALUE`."""
    for index, item in enumerate(args):
        if item == flag:
            return args[index + 1]
        if item.startswith(flag + "="):
            return item.removeprefix(flag + "=")
    raise AssertionError(f"{flag} is not in {args}")


def all_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(container, pod securityContext) for every container the chart defines, in both modes."""
    out = []
    for d in docs:
        if d["kind"] == "EnvoyProxy":
            pod, envoy, inits = eg_pod([d])
            out += [(c, pod["securityContext"]) for c in [{"name": "envoy", **envoy}, *inits]]
            patch = d["spec"]["provider"]["kubernetes"]["envoyDeployment"].get("patch")
            if patch:
                out += [(c, pod["securityContext"]) for c in patch["value"]["spec"]["template"]["spec"]["containers"]]
        elif d["kind"] == "Pod":  # the `helm test` pod
            out += [(c, d["spec"]["securityContext"]) for c in d["spec"]["containers"]]
        elif d["kind"] == "Deployment":
            spec = d["spec"]["template"]["spec"]
            out += [(c, spec["securityContext"]) for c in spec.get("initContainers", []) + spec["containers"]]
    return out


def standalone(render: Render, tmp: Path, *values: Path, **sets: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    docs = render(CI / "standalone-values.yaml", *values, sets={"socket.dir": str(tmp / "sock"), **sets})
    bootstrap = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap" and "envoy.yaml" in d["data"])["data"]["envoy.yaml"]
    )
    sidecar = next(c for c, _ in all_containers(docs) if c["name"] == "envoy-sidecar")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])["data"]["sidecar.yaml"]
    return bootstrap, sidecar, config


#: A plugin that declares one of each: delivered as `pluginFiles`, run by the sidecar as the chart runs it.
AUDIT_PLUGIN = """\
import json

from sidecar import Plugin


class Audit(Plugin):
    name = "audit"
    metadata_namespaces = ("audit",)
    forwarding_namespaces = ("envoy.filters.http.jwt_authn",)
    request_attributes = ("request.path", "source.address")
    response_attributes = ("response.code",)

    def on_request_headers(self, ctx, headers):
        ctx.set_metadata("request", json.dumps(ctx.attributes, sort_keys=True), namespace="audit")
        ctx.set_metadata("forwarded", json.dumps(ctx.metadata, sort_keys=True), namespace="audit")

    def on_response_headers(self, ctx, headers):
        ctx.set_metadata("response", json.dumps(ctx.attributes, sort_keys=True), namespace="audit")
"""


#: The chart values that grant what AUDIT_PLUGIN declares, and the declaration each one covers.
GRANTS = {
    "extProc.metadata.writableNamespaces": ("metadata_namespaces", ["audit"]),
    "extProc.metadata.accessibleNamespaces": ("forwarding_namespaces", ["envoy.filters.http.jwt_authn"]),
    "extProc.processingMode.request.attributes": ("request_attributes", ["request.path", "source.address"]),
    "extProc.processingMode.response.attributes": ("response_attributes", ["response.code"]),
}


def declaring_values(tmp_path: Path, without: str | None = None, extra: dict[str, list[str]] | None = None) -> Path:
    """A values file: header-stamp and AUDIT_PLUGIN in the default chain, every grant but `without`."""
    values: dict[str, Any] = {
        "pluginFiles": {"audit_plugin.py": AUDIT_PLUGIN},
        "sidecar": {"plugins": [{"use": "header-stamp"}, {"use": "audit_plugin:Audit"}]},
    }
    grants = {key: names for key, (_, names) in GRANTS.items() if key != without}
    for dotted, names in {**grants, **(extra or {})}.items():
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = names
    path = tmp_path / "declaring-values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


_BODY = {
    "Streamed": "STREAMED",
    "Buffered": "BUFFERED",
    "BufferedPartial": "BUFFERED_PARTIAL",
    "FullDuplexStreamed": "FULL_DUPLEX_STREAMED",
}


def envoy_side_mode(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The processing mode the rendered Envoy config asks for, in Envoy's enum names."""
    policies = [d for d in docs if d["kind"] == "EnvoyExtensionPolicy"]
    if policies:
        pm = policies[0]["spec"]["extProc"][0]["processingMode"]
        mode = {}
        for side in ("request", "response"):
            block = pm.get(side)
            mode[f"{side}_header_mode"] = "SEND" if block is not None else "SKIP"
            mode[f"{side}_body_mode"] = _BODY.get((block or {}).get("body", ""), "NONE")
        return mode
    bootstrap = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap" and "envoy.yaml" in d["data"])["data"]["envoy.yaml"]
    )
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    return dict(ext_proc["typed_config"]["processing_mode"])


def seconds(value: Any) -> Any:
    """'0.250s' / '250ms' / '1s' -> 0.25 / 1.0, recursively, so configs written by hand and by code compare."""
    if isinstance(value, dict):
        return {k: seconds(v) for k, v in value.items()}
    if isinstance(value, list):
        return [seconds(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[0-9.]+m?s", value):
        return float(value[:-2]) / 1000 if value.endswith("ms") else float(value[:-1])
    if isinstance(value, str) and value.isdigit():
        return int(value)  # proto JSON writes int64 as a string
    return value


def sidecar_parts(bootstrap: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the sidecar cluster, the ext_proc filter config) of a bootstrap."""
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "envoy-sidecar")
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    return cluster, ext_proc
