"""The Helm chart, rendered by a real helm: lint, schema validation of every manifest (Kubernetes and EG
CRDs), the run-time invariants (socket path, shared volume, UIDs, Wasm ordering, probes), bad values,
and the standalone bootstrap validated and run end to end with a real Envoy and the sidecar."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import celpy.adapter
import jsonschema
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes

from sidecar.stack.demo import EchoBackend
from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.stack.sidecar import SidecarProcess
from tests.support import chartdoc
from tests.support.chart import (
    AUDIT_PLUGIN,
    CI,
    all_containers,
    arg,
    declaring_values,
    eg_pod,
    envoy_side_mode,
    one,
    seconds,
    sidecar_parts,
    standalone,
)
from tests.support.helm import CHART, Render, helm_template
from tests.support.wait import wait_for
from tests.support.wat import add_header

CASES = sorted(p.name for p in CI.glob("*-values.yaml"))
EG_CRDS = CHART.parents[2] / "shared" / "reference" / "eg-v1.9.0" / "crds"
K8S_VERSION = "1.33"
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
IN_PROCESS = "standalone-inprocess-values.yaml"  # its own tests: test_helm_inprocess.py


def test_ci_cases_cover_the_acceptance_list() -> None:
    assert {
        "eg-extproc-values.yaml",
        "eg-wasm-values.yaml",
        "standalone-values.yaml",
        "all-options-values.yaml",
    } <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(helm: Path, case: str) -> None:
    proc = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "-f", str(CI / case)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


# ---- schema validation ---------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """CRD OpenAPI -> JSON Schema that rejects unknown fields (the API server would silently prune them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> the CRD's OpenAPI schema as shipped (x-kubernetes-* extensions included)."""
    schemas: dict[tuple[str, str], Any] = {}
    for path in EG_CRDS.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                api = f"{spec['group']}/{version['name']}"
                schemas[(api, spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


@cache
def _cel(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_check(schema: dict[str, Any], value: Any, path: str, report: dict[str, list[str]]) -> None:
    """Evaluate the CRD's CEL rules (x-kubernetes-validations) the way the API server would, where cel-python can."""
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rules need a previous object
        try:
            result = _cel(rule["rule"]).evaluate({"self": celpy.adapter.json_to_cel(value)})
        except Exception:  # a Kubernetes CEL library function cel-python lacks
            report["unevaluated"].append(rule["rule"])
            continue
        if isinstance(result, celtypes.BoolType):
            report["evaluated"].append(rule["rule"])
            if not result:
                report["failed"].append(f"{path or '.'}: {rule.get('message', rule['rule'])}")
        else:
            report["unevaluated"].append(rule["rule"])
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in schema.get("properties", {}):
                _cel_check(schema["properties"][key], sub, f"{path}.{key}", report)
            elif isinstance(schema.get("additionalProperties"), dict):
                _cel_check(schema["additionalProperties"], sub, f"{path}.{key}", report)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _cel_check(schema["items"], item, f"{path}[{i}]", report)


def _defaulted(schema: dict[str, Any], value: Any) -> Any:
    """The object with the schema's defaults filled in, as the API server does before CEL rules run."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out = {k: _defaulted(props.get(k, {}), v) for k, v in value.items()}
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_defaulted(schema["items"], v) for v in value]
    return value


def _validate_crd(doc: dict[str, Any]) -> dict[str, list[str]]:
    schema = _crd_schemas()[(doc["apiVersion"], doc["kind"])]
    jsonschema.validate(doc, _strict(schema))
    report: dict[str, list[str]] = {"evaluated": [], "unevaluated": [], "failed": []}
    _cel_check(schema, _defaulted(schema, doc), "", report)
    assert report["failed"] == [], report["failed"]
    assert report["unevaluated"] == [], f"CEL rules cel-python could not evaluate: {report['unevaluated']}"
    return report


def _validate(doc: dict[str, Any]) -> str:
    if doc["apiVersion"].startswith("gateway.envoyproxy.io/"):
        if not EG_CRDS.is_dir():
            return "skipped (no ../shared EG CRDs)"
        _validate_crd(doc)
        return "eg-crd"
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        assert doc["spec"]["endpoints"][0]["port"] == "sidecar-metrics"
        return "no schema (prometheus-operator CRD)"
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return "k8s"


@pytest.mark.parametrize("case", CASES)
def test_rendered_manifests_validate(render: Render, case: str) -> None:
    docs = render(CI / case)
    assert docs
    how = {f"{d['kind']}/{d['metadata']['name']}": _validate(d) for d in docs}
    if EG_CRDS.is_dir() and case.startswith("eg-"):
        assert {"EnvoyProxy", "Backend", "EnvoyExtensionPolicy"} <= {d["kind"] for d in docs}
        assert "eg-crd" in how.values()
    assert "k8s" in how.values()


def test_crd_cel_rules_are_evaluated_and_can_fail(render: Render) -> None:
    if not EG_CRDS.is_dir():
        pytest.skip("no ../shared EG CRDs")
    docs = render(CI / "all-options-values.yaml")
    policy = next(d for d in docs if d["kind"] == "EnvoyExtensionPolicy")
    report = _validate_crd(policy)
    assert any("targetRefs" in rule for rule in report["evaluated"])
    bad = json.loads(json.dumps(policy))
    bad["spec"]["targetRef"] = bad["spec"]["targetRefs"][0]  # both targetRef and targetRefs: refused
    with pytest.raises(AssertionError, match="either targetRef or targetRefs"):
        _validate_crd(bad)


def test_strict_crd_validation_catches_a_misspelt_field() -> None:
    if not EG_CRDS.is_dir():
        pytest.skip("no ../shared EG CRDs")
    bad = {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": "x"},
        "spec": {"endpoints": [{"unix": {"pth": "/x.sock"}}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)


# ---- helpers over rendered EG / standalone pods -------------------------------------------------


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("case", ["eg-extproc-values.yaml", "eg-wasm-values.yaml", "all-options-values.yaml"])
def test_eg_socket_path_volume_and_identity_agree(render: Render, case: str) -> None:
    docs = render(CI / case)
    pod, envoy, inits = eg_pod(docs)
    sidecar = next(c for c in inits if c["name"] == "envoy-sidecar")
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: up before Envoy, down after it
    listen = arg(sidecar["args"], "--listen").removeprefix("unix:")
    workers = int(arg(sidecar["args"], "--workers"))
    # The Backend's unix endpoints are exactly the sockets `sidecar serve --listen ... --workers N` creates.
    backend_paths = [e["unix"]["path"] for e in one(docs, "Backend")["spec"]["endpoints"]]
    listen_path = Path(listen)
    expected = (
        [listen]
        if workers == 1
        else [str(listen_path.with_name(f"{listen_path.stem}-{i}{listen_path.suffix}")) for i in range(workers)]
    )
    assert backend_paths == expected
    assert all(len(p) <= 107 for p in backend_paths)
    # Every policy routes through that Backend.
    backend_name = one(docs, "Backend")["metadata"]["name"]
    policies = [d for d in docs if d["kind"] == "EnvoyExtensionPolicy"]
    assert policies
    for policy in policies:
        refs = policy["spec"]["extProc"][0]["backendRefs"]
        assert refs == [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": backend_name}]
        health = policy["spec"]["extProc"][0].get("backendSettings", {}).get("healthCheck", {}).get("active")
        if workers > 1:  # Envoy health-checks each worker's socket with the gRPC health service
            assert health["type"] == "GRPC" and health["grpc"]["service"] == EXTPROC_SERVICE
        else:
            assert health is None
    # The socket directory is one volume, mounted at the same path in the sidecar and in Envoy.
    socket_dir = str(listen_path.parent)
    volumes = {v["name"]: v for v in pod["volumes"]}
    shared = [name for name, m in _mounts(sidecar).items() if m["mountPath"] == socket_dir]
    assert len(shared) == 1 and "emptyDir" in volumes[shared[0]]
    assert _mounts(envoy)[shared[0]]["mountPath"] == socket_dir
    assert not _mounts(envoy)[shared[0]].get("readOnly")
    # Envoy can connect: same UID, or the socket's group (pod fsGroup) with group rw.
    mode = int(arg(sidecar["args"], "--socket-mode"), 8)
    same_uid = sidecar["securityContext"]["runAsUser"] == envoy["securityContext"]["runAsUser"]
    # fsGroup owns the emptyDir (setgid), so the socket's group is fsGroup, a supplementary group of Envoy.
    via_group = pod["securityContext"].get("fsGroup", 0) > 0 and mode & 0o060 == 0o060
    assert same_uid or via_group
    assert mode & 0o007 == 0  # never world-accessible
    # The sidecar's config file is the ConfigMap the pod mounts, in the namespace EG runs Envoy pods in.
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config"))
    assert volumes["envoy-sidecar-config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert arg(sidecar["args"], "--config").startswith(_mounts(sidecar)["envoy-sidecar-config"]["mountPath"])
    assert yaml.safe_load(cm["data"]["sidecar.yaml"])["chains"]["default"]["plugins"]


@pytest.mark.parametrize("case", ["eg-wasm-values.yaml", "all-options-values.yaml"])
def test_eg_wasm_pulled_before_envoy_into_the_file_envoy_loads(render: Render, case: str) -> None:
    docs = render(CI / case)
    pod, envoy, inits = eg_pod(docs)
    names = [c["name"] for c in inits]
    pulls = [c for c in inits if c["name"].startswith("wasm-pull-")]
    assert pulls
    # Regular init containers (no restartPolicy) listed before the native sidecar: each must finish
    # before the next starts, and all init containers finish before Envoy (the main container) starts.
    assert all("restartPolicy" not in c for c in pulls)
    assert max(names.index(c["name"]) for c in pulls) < names.index("envoy-sidecar")
    patch = one(docs, "EnvoyPatchPolicy")
    filenames = {
        p["operation"]["value"]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]
        for p in patch["spec"]["jsonPatches"]
    }
    outputs = set()
    for c in pulls:
        assert c["args"][:2] == ["wasm", "pull"]
        assert len(arg(c["args"], "--sha256")) == 64
        output = arg(c["args"], "--output")
        outputs.add(output)
        assert arg(c["args"], "--cache-dir").startswith(str(Path(output).parent))
        wasm_volume = next(n for n, m in _mounts(c).items() if m["mountPath"] == str(Path(output).parent))
        envoy_mount = _mounts(envoy)[wasm_volume]
        assert envoy_mount["mountPath"] == str(Path(output).parent) and envoy_mount["readOnly"] is True
        if "--pull-secret" in c["args"]:
            secret_file = Path(arg(c["args"], "--pull-secret"))
            vol = next(n for n, m in _mounts(c).items() if m["mountPath"] == str(secret_file.parent))
            assert {v["name"]: v for v in pod["volumes"]}[vol]["secret"]["items"][0]["key"] == ".dockerconfigjson"
            assert vol not in _mounts(envoy)  # credentials only where they are used
    assert filenames == outputs


@pytest.mark.parametrize("workers", ["1", "3"])
def test_standalone_socket_wasm_and_volumes_agree(render: Render, workers: str) -> None:
    sets = {"sidecar.workers": workers, "wasm.listeners[0]": "unused", **WASM_SETS}
    docs = render(CI / "standalone-values.yaml", sets=sets)
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["initContainers"] + spec["containers"]}
    sidecar, envoy = containers["envoy-sidecar"], containers["envoy"]
    assert sidecar["restartPolicy"] == "Always"
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("wasm-pull-add-header") < names.index("envoy-sidecar")
    listen = Path(arg(sidecar["args"], "--listen").removeprefix("unix:"))
    bootstrap = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap" and "envoy.yaml" in d["data"])["data"]["envoy.yaml"]
    )
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "envoy-sidecar")
    pipes = [
        e["endpoint"]["address"]["pipe"]["path"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    n = int(workers)
    assert pipes == (
        [str(listen)] if n == 1 else [str(listen.with_name(f"{listen.stem}-{i}{listen.suffix}")) for i in range(n)]
    )
    assert ("health_checks" in cluster) == (n > 1)
    socket_volume = next(name for name, m in _mounts(sidecar).items() if m["mountPath"] == str(listen.parent))
    assert _mounts(envoy)[socket_volume]["mountPath"] == str(listen.parent)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]
    (output,) = _pull_outputs(docs)
    assert wasm == str(output)
    wasm_volume = next(
        name for name, m in _mounts(containers["wasm-pull-add-header"]).items() if m["mountPath"] == str(output.parent)
    )
    assert _mounts(envoy)[wasm_volume] == {"name": wasm_volume, "mountPath": str(output.parent), "readOnly": True}
    assert [f["name"] for f in hcm["http_filters"]][-2:] == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    envoy_cm = next(d for d in docs if d["kind"] == "ConfigMap" and "envoy.yaml" in d["data"])
    assert {v["name"]: v for v in spec["volumes"]}["envoy-config"]["configMap"]["name"] == envoy_cm["metadata"]["name"]


def test_eg_modules_delivered_by_envoy_gateway_go_to_the_policy(render: Render) -> None:
    docs = render(CI / "all-options-values.yaml")
    wasm = [w for d in docs if d["kind"] == "EnvoyExtensionPolicy" for w in d["spec"].get("wasm", [])]
    assert {w["name"] for w in wasm} == {"eg-fetched"}
    assert wasm[0]["code"] == {
        "type": "Image",
        "image": {
            "url": "registry.example.com/team/eg-fetched:1.0.0",
            "sha256": "3" * 64,
            "pullSecretRef": {"name": "wasm-creds"},
        },
    }
    _, _, inits = eg_pod(docs)
    assert "wasm-pull-eg-fetched" not in [c["name"] for c in inits]


@pytest.mark.parametrize("case", CASES)
def test_no_container_runs_as_root_and_all_are_hardened(render: Render, case: str) -> None:
    containers = all_containers(render(CI / case))
    assert containers
    for c, pod in containers:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and pod["runAsNonRoot"] is True
        assert sc.get("runAsUser", pod.get("runAsUser", 0)) != 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        if c["name"] != "envoy":
            assert "resources" in c


@pytest.mark.parametrize("case", CASES)
def test_sidecar_probes_ask_the_grpc_health_service_on_every_socket(render: Render, case: str) -> None:
    docs = render(CI / case)
    names = [c["name"] for c, _ in all_containers(docs)]
    if case == IN_PROCESS:  # the chains run inside Envoy: no sidecar, no socket to probe
        assert "envoy-sidecar" not in names
        return
    sidecar = next(c for c, _ in all_containers(docs) if c["name"] == "envoy-sidecar")
    listen = Path(arg(sidecar["args"], "--listen").removeprefix("unix:"))
    workers = int(arg(sidecar["args"], "--workers"))
    for probe, service in (("startupProbe", ""), ("livenessProbe", ""), ("readinessProbe", EXTPROC_SERVICE)):
        cmd = sidecar[probe]["exec"]["command"]
        assert "health_status" in cmd[2]
        assert cmd[3] == service
        sockets = cmd[4:]
        assert len(sockets) == workers and all(Path(s).parent == listen.parent for s in sockets)


def test_native_sidecar_off_falls_back_to_a_container_with_prestop(render: Render) -> None:
    docs = render(CI / "eg-extproc-values.yaml", sets={"sidecar.nativeSidecar": "false"})
    dep = one(docs, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    assert "envoy-sidecar" not in [c["name"] for c in dep.get("initContainers", [])]
    (container,) = dep["patch"]["value"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "envoy-sidecar" and "restartPolicy" not in container
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    # The patch is free-form in the CRD: validate what it merges as a Kubernetes Deployment would.
    kubernetes_validate.validate(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "envoy"},
            "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}}, **dep["patch"]["value"]["spec"]["template"]},
            },
        },
        K8S_VERSION,
        strict=True,
    )
    docs = render(CI / "standalone-values.yaml", sets={"sidecar.nativeSidecar": "false"})
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["envoy", "envoy-sidecar"]


def test_plugin_files_configmap_is_on_pythonpath(render: Render) -> None:
    docs = render(CI / "all-options-values.yaml")
    plugins = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-plugins"))
    assert "edge_plugins.py" in plugins["data"]
    sidecar = next(c for c, _ in all_containers(docs) if c["name"] == "envoy-sidecar")
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["PYTHONPATH"].split(":")[0] == _mounts(sidecar)["envoy-sidecar-plugins"]["mountPath"]
    assert plugins["metadata"]["namespace"] == "edge-system"


# ---- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"envoyGateway.targets": "null"}, "targets"),
        ({"envoyGateway.gateway.name": ""}, "gateway"),
        ({"extProc.processingMode.request.body": "Bufferd"}, "Buffered"),
        ({"socket.dir": "/var/run/" + "d" * 88, "socket.name": "extproc-socket-file.sock"}, "at most 107"),
        ({"socket.dir": "/var/run/" + "d" * 100}, "socket/dir"),
        ({"sidecar.workers": "3", "socket.dir": "/var/run/" + "d" * 86}, "at most 107"),
        ({"socket.mode": "0666"}, "socket/mode"),
        ({"wasm.modules[0].name": "m", "wasm.modules[0].image": "r/m:1"}, "sha256"),
        ({"containerSecurityContext.runAsNonRoot": "false"}, "runAsNonRoot"),
        ({"mode": "sidecarless"}, "mode"),
        (
            {
                "wasm.dir": "/var/run/envoy-sidecar/wasm",
                "wasm.listeners[0]": "http",
                "wasm.modules[0].name": "m",
                "wasm.modules[0].image": "r/m:1",
                "wasm.modules[0].sha256": "ab" * 32,
            },
            "separate volumes",
        ),
        (
            {"wasm.modules[0].name": "Bad_Name", "wasm.modules[0].image": "r/m:1", "wasm.modules[0].sha256": "ab" * 32},
            "wasm/modules/0/name",
        ),
    ],
)
def test_bad_values_fail_with_a_message(helm: Path, sets: dict[str, str], message: str) -> None:
    proc = helm_template(helm, CI / "eg-extproc-values.yaml", sets=sets)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# ---- privilege: refused by the schema unless security.allowPrivileged ------------------------------

# name -> (values that add a privilege, what helm's schema error names, what the render shows once allowed).
PRIVILEGES: dict[str, tuple[dict[str, Any], str, str]] = {
    "add-sys-admin-net-admin": (
        {"containerSecurityContext": {"capabilities": {"add": ["SYS_ADMIN", "NET_ADMIN"]}}},
        "/containerSecurityContext/capabilities/add",
        "SYS_ADMIN",
    ),
    "add-any-capability": (
        {"containerSecurityContext": {"capabilities": {"add": ["CHOWN"]}}},
        "/containerSecurityContext/capabilities/add",
        "CHOWN",
    ),
    "drop-nothing": (
        {"containerSecurityContext": {"capabilities": {"drop": []}}},
        "/containerSecurityContext/capabilities/drop",
        "drop: []",
    ),
    "capabilities-removed": (
        {"containerSecurityContext": {"capabilities": None}},
        "missing property 'capabilities'",
        "readOnlyRootFilesystem",
    ),
    "seccomp-unconfined": (
        {"containerSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
        "/containerSecurityContext/seccompProfile/type",
        "type: Unconfined",
    ),
    "seccomp-removed": (
        {"containerSecurityContext": {"seccompProfile": None}},
        "missing property 'seccompProfile'",
        "readOnlyRootFilesystem",
    ),
    "apparmor-unconfined": (
        {"containerSecurityContext": {"appArmorProfile": {"type": "Unconfined"}}},
        "/containerSecurityContext/appArmorProfile/type",
        "appArmorProfile",
    ),
    "writable-root": (
        {"containerSecurityContext": {"readOnlyRootFilesystem": False}},
        "/containerSecurityContext/readOnlyRootFilesystem",
        "readOnlyRootFilesystem: false",
    ),
    "escalation-null": (
        {"containerSecurityContext": {"allowPrivilegeEscalation": None}},
        "missing property 'allowPrivilegeEscalation'",
        "readOnlyRootFilesystem",
    ),
    "escalation-true": (
        {"containerSecurityContext": {"allowPrivilegeEscalation": True}},
        "/containerSecurityContext/allowPrivilegeEscalation",
        "allowPrivilegeEscalation: true",
    ),
    "privileged": (
        {"containerSecurityContext": {"privileged": True}},
        "/containerSecurityContext/privileged",
        "privileged: true",
    ),
    "run-as-root-flag": (
        {"containerSecurityContext": {"runAsNonRoot": False}},
        "/containerSecurityContext/runAsNonRoot",
        "runAsNonRoot: false",
    ),
    "container-uid-0": (
        {"containerSecurityContext": {"runAsUser": 0}},
        "/containerSecurityContext/runAsUser",
        "runAsNonRoot",
    ),
    "uid-0": ({"security": {"runAsUser": 0}}, "/security/runAsUser", "runAsUser: 0"),
    "gid-0": ({"security": {"runAsGroup": 0}}, "/security/runAsGroup", "runAsGroup: 0"),
    "fsgroup-0": ({"security": {"fsGroup": 0}}, "/security/fsGroup", "fsGroup: 0"),
    "proc-mount-unmasked": (
        {"containerSecurityContext": {"procMount": "Unmasked"}},
        "/containerSecurityContext/procMount",
        "procMount: Unmasked",
    ),
    "selinux-level": (
        {"containerSecurityContext": {"seLinuxOptions": {"level": "s0:c0.c1023"}}},
        "'level'",
        "s0:c0.c1023",
    ),
    "selinux-user": (
        {"containerSecurityContext": {"seLinuxOptions": {"user": "system_u", "role": "system_r"}}},
        "'user'",
        "system_u",
    ),
    "selinux-spc-type": (
        {"containerSecurityContext": {"seLinuxOptions": {"type": "spc_t"}}},
        "/containerSecurityContext/seLinuxOptions/type",
        "spc_t",
    ),
    "windows-host-process": (
        {"containerSecurityContext": {"windowsOptions": {"hostProcess": True}}},
        "/containerSecurityContext/windowsOptions/hostProcess",
        "hostProcess: true",
    ),
    "host-path-root": (
        {"extraVolumes": [{"name": "root", "hostPath": {"path": "/"}}]},
        "'hostPath'",
        "path: /",
    ),
    "host-path-docker-socket": (
        {"extraVolumes": [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}}]},
        "'hostPath'",
        "docker.sock",
    ),
    "nfs-volume": (
        {"extraVolumes": [{"name": "share", "nfs": {"server": "10.0.0.1", "path": "/"}}]},
        "'nfs'",
        "10.0.0.1",
    ),
    "bidirectional-mount": (
        {
            "extraVolumes": [{"name": "scratch", "emptyDir": {}}],
            "sidecar": {
                "extraVolumeMounts": [{"name": "scratch", "mountPath": "/s", "mountPropagation": "Bidirectional"}]
            },
        },
        "/sidecar/extraVolumeMounts/0/mountPropagation",
        "Bidirectional",
    ),
}


def _values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "privilege-values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("case", sorted(PRIVILEGES))
def test_privilege_is_refused_unless_explicitly_allowed(helm: Path, case: str, tmp_path: Path) -> None:
    values, message, rendered = PRIVILEGES[case]
    extra = _values_file(tmp_path, values)
    for base in (CI / "eg-extproc-values.yaml", CI / "standalone-values.yaml"):
        refused = helm_template(helm, base, extra)
        assert refused.returncode != 0, f"{case} accepted without security.allowPrivileged"
        assert "values don't meet the specifications of the schema" in refused.stderr
        assert message in refused.stderr, refused.stderr
        allowed = helm_template(helm, base, extra, sets={"security.allowPrivileged": "true"})
        assert allowed.returncode == 0, allowed.stderr
        assert rendered in allowed.stdout


@pytest.mark.parametrize("case", ["add-sys-admin-net-admin", "host-path-root", "escalation-null"])
def test_helm_lint_refuses_privilege_too(helm: Path, case: str, tmp_path: Path) -> None:
    extra = _values_file(tmp_path, PRIVILEGES[case][0])
    args = [str(helm), "lint", "--strict", str(CHART), "-f", str(CI / "eg-extproc-values.yaml"), "-f", str(extra)]
    refused = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0 and PRIVILEGES[case][1] in refused.stdout + refused.stderr
    allowed = subprocess.run(
        [*args, "--set", "security.allowPrivileged=true"], capture_output=True, text=True, timeout=120, check=False
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


@pytest.mark.parametrize(
    "field", ["hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace", "automountServiceAccountToken"]
)
def test_pod_level_host_access_is_not_a_chart_value(helm: Path, field: str, tmp_path: Path) -> None:
    """The chart exposes no pod-level host namespace or token setting: refused even with the override."""
    extra = _values_file(tmp_path, {field: True})
    for sets in ({}, {"security.allowPrivileged": "true"}):
        proc = helm_template(helm, CI / "eg-extproc-values.yaml", extra, sets=sets)
        assert proc.returncode != 0 and f"additional properties '{field}' not allowed" in proc.stderr, proc.stderr


def test_allow_privileged_is_off_by_default_and_only_a_boolean(helm: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["security"]["allowPrivileged"] is False
    proc = helm_template(helm, CI / "eg-extproc-values.yaml", sets={"security.allowPrivileged": "yes"})
    assert proc.returncode != 0 and "/security/allowPrivileged" in proc.stderr


def test_kubernetes_version_gates(helm: Path) -> None:
    old = helm_template(helm, CI / "eg-extproc-values.yaml", kube_version="1.28.0")
    assert old.returncode != 0 and "sidecar.nativeSidecar=false" in old.stderr
    fallback = helm_template(
        helm, CI / "eg-extproc-values.yaml", sets={"sidecar.nativeSidecar": "false"}, kube_version="1.28.0"
    )
    assert fallback.returncode == 0, fallback.stderr
    no_native = {"sidecar.nativeSidecar": "false"}
    assert (
        "preStopSeconds"
        in helm_template(helm, CI / "standalone-values.yaml", sets=no_native, kube_version="1.28.0").stderr
    )
    no_native["standalone.envoy.preStopSeconds"] = "0"
    done = helm_template(helm, CI / "standalone-values.yaml", sets=no_native, kube_version="1.28.0")
    assert done.returncode == 0 and "preStop" in done.stdout  # the sidecar's exec preStop remains
    assert "sleep:" not in done.stdout


def test_standalone_needs_an_upstream(helm: Path) -> None:
    proc = helm_template(helm, CI / "standalone-values.yaml", sets={"standalone.upstream.host": ""})
    assert proc.returncode != 0 and "standalone.upstream.host" in proc.stderr


# ---- standalone: the rendered bootstrap in a real Envoy, with the rendered sidecar command ---------


def test_standalone_bootstrap_passes_envoy_validate(render: Render, tmp_path: Path) -> None:
    bootstrap, _, _ = standalone(
        render, tmp_path, **{"sidecar.workers": "2", "extProc.processingMode.request.body": "FullDuplexStreamed"}
    )
    pm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"
    ][0]["typed_config"]["processing_mode"]
    assert pm["request_body_mode"] == "FULL_DUPLEX_STREAMED" and pm["request_trailer_mode"] == "SEND"
    validate_bootstrap(bootstrap)
    bootstrap["static_resources"]["clusters"][0]["typo_field"] = 1
    with pytest.raises(Exception, match="rejected"):
        validate_bootstrap(bootstrap)


WASM_ADD_HEADER = add_header("local")
WASM_SETS = {
    "wasm.modules[0].name": "add-header",
    "wasm.modules[0].image": "registry.example.com/team/add-header:1.0.0",
    "wasm.modules[0].sha256": "ab" * 32,
}


def _wasm_module() -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm(WASM_ADD_HEADER))


def _pull_outputs(docs: list[dict[str, Any]]) -> list[Path]:
    """Where the rendered wasm-pull init containers write (we play `sidecar wasm pull` here)."""
    return [Path(arg(c["args"], "--output")) for c, _ in all_containers(docs) if c["name"].startswith("wasm-pull-")]


def test_eg_wasm_patch_is_a_valid_envoy_filter_loading_the_pulled_file(render: Render, tmp_path: Path) -> None:
    docs = render(CI / "eg-wasm-values.yaml", sets={"wasm.dir": str(tmp_path / "wasm")})
    (output,) = _pull_outputs(docs)
    output.parent.mkdir()
    output.write_bytes(_wasm_module())
    patch = one(docs, "EnvoyPatchPolicy")["spec"]["jsonPatches"][0]
    assert patch["operation"]["path"].endswith("/http_filters/0")
    bootstrap, _, _ = standalone(render, tmp_path)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, patch["operation"]["value"])  # what the JSON patch does to EG's listener
    validate_bootstrap(bootstrap)
    output.unlink()  # no module where local.filename points: Envoy refuses the config
    with pytest.raises(Exception, match="rejected"):
        validate_bootstrap(bootstrap)


#: Test-side additions to the chart's bootstrap: dynamic metadata in a namespace Envoy forwards (as jwt_authn
#: would set it), and an access log of the namespace the plugin writes.
_FORWARDED_FILTER = {
    "name": "envoy.filters.http.set_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [{"metadata_namespace": "envoy.filters.http.jwt_authn", "value": {"sub": "alice"}}],
    },
}


def _audit_access_log(path: Path) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"json_format": {"path": "%REQ(:PATH)%", "audit": "%DYNAMIC_METADATA(audit)%"}},
        },
    }


@pytest.mark.envoy
def test_standalone_runs_end_to_end(render: Render, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = EchoBackend().start()
    host, port = backend.address
    try:
        sets = {
            "standalone.upstream.host": host,
            "standalone.upstream.port": str(port),
            "wasm.dir": str(tmp_path / "wasm"),
            **WASM_SETS,
        }
        # header-stamp and a plugin that declares a namespace it writes, one it reads and attributes.
        declaring = declaring_values(tmp_path)
        docs = render(CI / "standalone-values.yaml", declaring, sets={"socket.dir": str(tmp_path / "sock"), **sets})
        bootstrap, sidecar, config = standalone(render, tmp_path, declaring, **sets)
        (output,) = _pull_outputs(docs)
        output.parent.mkdir()
        output.write_bytes(_wasm_module())
        (tmp_path / "plugins").mkdir()
        (tmp_path / "plugins" / "audit_plugin.py").write_text(AUDIT_PLUGIN)  # the chart's pluginFiles ConfigMap
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")]))
        for listener in bootstrap["static_resources"]["listeners"]:
            listener["address"]["socket_address"]["port_value"] = 0
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"].insert(0, _FORWARDED_FILTER)
        hcm["access_log"] = [_audit_access_log(tmp_path / "access.log")]
        # The sidecar's own command line, as the chart renders it (only the config file's path changes).
        args = list(sidecar["args"])
        assert args[0] == "serve"
        config_path = tmp_path / "sidecar.yaml"
        config_path.write_text(config)
        args[args.index("--config") + 1] = str(config_path)
        args[args.index("--metrics") + 1] = "127.0.0.1:0"
        sockets = [Path(p) for p in sidecar["readinessProbe"]["exec"]["command"][4:]]
        with (
            SidecarProcess(args[1:], sockets, log_path=tmp_path / "sidecar.log") as sidecar_proc,
            Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy,
        ):
            # The chart's readiness probe command, run for real against the live socket.
            probe = sidecar["readinessProbe"]["exec"]["command"]
            proc = subprocess.run([sys.executable, *probe[1:]], capture_output=True, text=True, timeout=30, check=False)
            assert proc.returncode == 0, shlex.join(probe) + proc.stderr
            stat = sockets[0].stat()
            assert oct(stat.st_mode & 0o777) == oct(int(arg(args, "--socket-mode"), 8))
            lhost, lport = envoy.listener_address("main")
            with urllib.request.urlopen(f"http://{lhost}:{lport}/hello", timeout=10) as resp:
                assert resp.status == 200
                echoed = json.loads(resp.read())
            # The pre-pulled Wasm module ran (local.filename) and so did header-stamp in the sidecar.
            assert echoed["headers"]["x-wasm"] == "local"
            assert echoed["headers"]["x-stamped-by"] == "envoy-sidecar"
            assert envoy.stats("http.ingress.ext_proc")["http.ingress.ext_proc.sidecar.streams_started"] >= 1
            # What the plugin declared and the chart granted: Envoy kept the metadata it wrote in `audit`, sent
            # the attributes and forwarded the jwt_authn namespace.
            wait_for(lambda: _access_line(tmp_path / "access.log", "/hello"), 10, "the access log line")
            audit = _access_line(tmp_path / "access.log", "/hello")
            assert audit is not None
            assert json.loads(audit["forwarded"]) == {"envoy.filters.http.jwt_authn": {"sub": "alice"}}
            request_attributes = json.loads(audit["request"])  # by name, whatever the filter is called
            assert request_attributes["request.path"] == "/hello"
            assert request_attributes["source.address"].startswith("127.0.0.1:")
            assert json.loads(audit["response"]) == {**request_attributes, "response.code": 200}
            # The chart's `helm test` script, pointed at this Envoy: passes now, fails once the sidecar is gone.
            test_cmd = one(docs, "Pod")["spec"]["containers"][0]["command"]
            helm_test = [sys.executable, *test_cmd[1:-1], f"http://{lhost}:{lport}/"]
            assert subprocess.run(helm_test, capture_output=True, timeout=30, check=False).returncode == 0
            rhost, rport = envoy.listener_address("ready")
            with urllib.request.urlopen(f"http://{rhost}:{rport}/ready", timeout=10) as resp:
                assert resp.status == 200
            # Without the sidecar, ext_proc fails closed (failOpen: false): 500, not an unprocessed request.
            assert sidecar_proc.stop() == 0  # SIGTERM: drains and exits 0
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(f"http://{lhost}:{lport}/hello", timeout=10)
            assert failed.value.code == 500
            failed.value.close()
            assert subprocess.run(helm_test, capture_output=True, timeout=30, check=False).returncode == 1
    finally:
        backend.stop()


def _access_line(path: Path, request_path: str) -> dict[str, Any] | None:
    """The `audit` metadata of the access log line for `request_path`, once Envoy has flushed it."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("path") == request_path:
            return dict(entry["audit"])
    return None


# ---- documentation and schema cover every value ----------------------------------------------------


def test_every_value_is_documented_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    documented = [key for _, key, _ in chartdoc.params(text)]
    for key in documented:
        chartdoc.lookup(values, key)  # a @param for a key that does not exist raises KeyError
    undocumented = [
        leaf for leaf in chartdoc.leaves(values) if not any(leaf == d or leaf.startswith(d + ".") for d in documented)
    ]
    assert undocumented == []
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for key in documented:
        node = schema
        for part in key.split("."):
            if "properties" not in node:
                break
            assert part in node["properties"], key
            node = node["properties"][part]


def test_readme_parameters_are_generated_from_values() -> None:
    readme = (CHART / "README.md").read_text()
    assert readme == chartdoc.render_readme(readme, (CHART / "values.yaml").read_text()), (
        "README.md is stale: run `python -m tests.support.chartdoc`"
    )
    assert "`socket.dir`" in readme


# ---- the sidecar reads the config the chart renders, and Envoy is asked for what the chains need ----


@pytest.mark.parametrize("case", CASES)
def test_rendered_sidecar_config_loads_and_envoy_sends_what_the_chains_need(
    render: Render, case: str, tmp_path: Path
) -> None:
    docs = render(CI / case)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])["data"]["sidecar.yaml"]
    (tmp_path / "sidecar.yaml").write_text(config)
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-plugins"):
            for name, source in d["data"].items():
                (plugin_dir / name).write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "plugins", "-c", str(tmp_path / "sidecar.yaml"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    if case == IN_PROCESS:
        return  # no ext_proc filter: Envoy hands the module every phase the chains ask for
    needed = json.loads(proc.stdout)["filter_processing_mode"]
    asked = envoy_side_mode(docs)
    for side in ("request", "response"):
        if needed[f"{side}_header_mode"] == "SEND":
            assert asked[f"{side}_header_mode"] == "SEND", (side, needed, asked)
        if needed[f"{side}_body_mode"] != "NONE":
            assert asked[f"{side}_body_mode"] == needed[f"{side}_body_mode"], (side, needed, asked)


def _snake(node: Any) -> Any:
    """EG's xDS testdata is camelCase proto-JSON; EnvoyPatchPolicy patches the proto-name (snake_case) form."""
    if isinstance(node, dict):
        return {
            re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", k).lower() if not k.startswith("@") else k: _snake(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_snake(v) for v in node]
    return node


def test_eg_wasm_patch_path_exists_in_an_eg_generated_listener(render: Render) -> None:
    listeners = EG_CRDS.parent / "xds-testdata" / "wasm.listeners.yaml"
    if not listeners.exists():
        pytest.skip("no ../shared EG xDS testdata")
    (listener,) = _snake(yaml.safe_load(listeners.read_text()))
    docs = render(
        CI / "eg-wasm-values.yaml",
        sets={"envoyGateway.gateway.name": "gateway-1", "envoyGateway.gateway.listeners[0]": "http"},
    )
    patches = one(docs, "EnvoyPatchPolicy")["spec"]["jsonPatches"]
    before = None
    for patch in patches:
        # EG names xDS listeners <gateway namespace>/<gateway>/<listener>; the testdata's Gateway is in envoy-gateway.
        assert patch["name"].split("/")[1:] == listener["name"].split("/")[1:]
        *parents, index = patch["operation"]["path"].strip("/").split("/")
        node: Any = listener
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert isinstance(node, list) and index == "0"
        before = [f["name"] for f in node]
        node.insert(0, patch["operation"]["value"])
    assert before is not None and before[-1] == "envoy.filters.http.router"
    assert node[0]["name"].startswith("envoy.filters.http.wasm/envoy-sidecar/")


# ---- faults: the chart routes around a failed worker and follows the chain's failure policy -----------
# The same settings as `sidecar envoy-config` and `sidecar render --format eg` (docs/reliability.md).


def _envoy_config_parts(workers: int, on_error: str = "fail_closed") -> tuple[dict[str, Any], dict[str, Any]]:
    from sidecar.chains import Registry
    from sidecar.config import ChainSpec, PluginSpec, SidecarConfig
    from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap

    chains = (ChainSpec("default", (PluginSpec("header-stamp"),), on_error),)
    bootstrap = build_bootstrap(Registry.from_specs(chains), SidecarConfig(chains, workers=workers), BootstrapOptions())
    return sidecar_parts(bootstrap)


FAULT_KEYS = ("connect_timeout", "circuit_breakers", "health_checks", "outlier_detection")


@pytest.mark.parametrize("workers", [1, 2])
def test_standalone_fault_settings_are_envoy_configs(render: Render, tmp_path: Path, workers: int) -> None:
    bootstrap, _, _ = standalone(render, tmp_path, **{"sidecar.workers": str(workers)})
    cluster, ext_proc = sidecar_parts(bootstrap)
    want_cluster, want_ext_proc = _envoy_config_parts(workers)
    for key in FAULT_KEYS:
        assert seconds(cluster.get(key)) == seconds(want_cluster.get(key)), key
    assert ("outlier_detection" in cluster) == (workers > 1)
    assert seconds(ext_proc["grpc_service"]["retry_policy"]) == seconds(want_ext_proc["grpc_service"]["retry_policy"])
    assert ext_proc["failure_mode_allow"] is False


@pytest.mark.parametrize("workers", [1, 2])
def test_eg_fault_settings_are_the_bundles(render: Render, workers: int) -> None:
    from sidecar.translate.backends import eg_backend_settings

    docs = render(CI / "eg-extproc-values.yaml", sets={"sidecar.workers": str(workers)})
    policies = [d for d in docs if d["kind"] == "EnvoyExtensionPolicy"]
    assert policies
    for policy in policies:
        (ext,) = policy["spec"]["extProc"]
        assert ext["backendSettings"] == eg_backend_settings(workers)
        assert ext["failOpen"] is False


def test_fail_open_default_chain_fails_open_in_both_modes(render: Render, tmp_path: Path) -> None:
    sets = {"sidecar.onError": "fail_open", "sidecar.workers": "2"}
    bootstrap, _, config = standalone(render, tmp_path, **sets)
    assert sidecar_parts(bootstrap)[1]["failure_mode_allow"] is True
    assert "on_error: fail_open" in config
    validate_bootstrap(bootstrap)
    docs = render(CI / "eg-extproc-values.yaml", sets=sets)
    assert {d["spec"]["extProc"][0]["failOpen"] for d in docs if d["kind"] == "EnvoyExtensionPolicy"} == {True}


@pytest.mark.parametrize("values", ["eg-extproc-values.yaml", "standalone-values.yaml"])
def test_fail_open_is_refused_for_a_fail_closed_chain(helm: Path, values: str) -> None:
    proc = helm_template(helm, CI / values, sets={"extProc.failOpen": "true"})
    assert proc.returncode != 0
    assert "extProc.failOpen: true would let requests through unprocessed" in proc.stderr
