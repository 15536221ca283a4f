"""Every generated config routes around a failed sidecar worker and follows the chain's failure policy.

`sidecar envoy-config`, `sidecar render` and `render --format eg` (the Helm chart is compared with these
in tests/deploy/test_helm.py). The behaviour itself is measured through a real Envoy in
tests/extproc/test_envoy_faults.py and benchmarks/faults.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.chains import Registry
from sidecar.cli import main
from sidecar.config import ChainSpec, PluginSpec, SidecarConfig
from sidecar.stack.envoy import validate_bootstrap
from sidecar.translate.backends import SIDECAR_FAULTS, eg_backend_settings
from sidecar.translate.bootstrap import BootstrapOptions, RouteSpec, build_bootstrap
from sidecar.wire import SERVICE_NAME
from tests.support.testplugins import TP
from tests.support.translate_kit import SIDECAR_ROUTE

EXT_PROC = "envoy.filters.http.ext_proc"


def _bootstrap(chains: tuple[ChainSpec, ...], workers: int, *routes: RouteSpec) -> dict[str, Any]:
    config = SidecarConfig(chains, workers=workers)
    options = BootstrapOptions(routes=routes or (RouteSpec("/"),))
    return build_bootstrap(Registry.from_specs(chains), config, options)


def _hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def _ext_proc(hcm: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in hcm["http_filters"] if f["name"].startswith(EXT_PROC))["typed_config"]  # type: ignore[no-any-return]


def _chain(name: str, on_error: str = "fail_closed", plugin: str = "AddHeaders") -> ChainSpec:
    return ChainSpec(name, (PluginSpec(TP + plugin),), on_error)


# ---- sidecar envoy-config / sidecar up ----------------------------------------------------------------


def test_envoy_config_routes_around_a_dead_or_stalled_worker() -> None:
    bootstrap = _bootstrap((_chain("default"),), 2)
    cluster = bootstrap["static_resources"]["clusters"][0]
    assert cluster["connect_timeout"] == "0.250s"
    (check,) = cluster["health_checks"]
    # no_traffic_interval too: Envoy schedules the next check with it until traffic has been seen.
    assert (check["interval"], check["no_traffic_interval"], check["timeout"]) == ("0.500s", "0.500s", "0.250s")
    assert check["grpc_health_check"] == {"service_name": SERVICE_NAME}
    outlier = cluster["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["consecutive_local_origin_failure"] == 1
    assert outlier["enforcing_consecutive_local_origin_failure"] == 100
    assert outlier["max_ejection_percent"] == 50
    assert cluster["circuit_breakers"]["thresholds"][0]["max_retries"] == SIDECAR_FAULTS.max_retries
    retry = _ext_proc(_hcm(bootstrap))["grpc_service"]["retry_policy"]
    assert retry["retry_on"] == "connect-failure,refused-stream,reset,unavailable"
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    validate_bootstrap(bootstrap)


def test_one_worker_keeps_the_retry_but_nothing_to_eject() -> None:
    bootstrap = _bootstrap((_chain("default"),), 1)
    cluster = bootstrap["static_resources"]["clusters"][0]
    assert "health_checks" not in cluster and "outlier_detection" not in cluster
    assert cluster["connect_timeout"] == "0.250s"
    assert "retry_policy" in _ext_proc(_hcm(bootstrap))["grpc_service"]


def test_only_fail_open_chains_fail_open_in_envoy() -> None:
    chains = (_chain("default"), _chain("open", "fail_open"), _chain("other"))
    hcm = _hcm(_bootstrap(chains, 2, RouteSpec("/"), RouteSpec("/open", "open"), RouteSpec("/other", "other")))
    assert not _ext_proc(hcm).get("failure_mode_allow", False)  # the filter itself never fails open
    overrides = {
        r["match"]["prefix"]: r.get("typed_per_filter_config", {}).get(EXT_PROC, {}).get("overrides", {})
        for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
    }
    assert overrides["/open"]["failure_mode_allow"] is True
    assert "failure_mode_allow" not in overrides["/other"] and "failure_mode_allow" not in overrides["/"]


def test_a_fail_open_default_chain_opens_the_routes_that_use_it() -> None:
    chains = (_chain("default", "fail_open"), _chain("strict"))
    hcm = _hcm(_bootstrap(chains, 1, RouteSpec("/"), RouteSpec("/strict", "strict")))
    routes = {r["match"]["prefix"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    assert routes["/"]["typed_per_filter_config"][EXT_PROC]["overrides"] == {"failure_mode_allow": True}
    assert "failure_mode_allow" not in routes["/strict"]["typed_per_filter_config"][EXT_PROC]["overrides"]


def test_no_fail_open_override_beside_a_full_duplex_chain() -> None:
    # Envoy then runs every stream FULL_DUPLEX_STREAMED, which cannot fail open: the route stays closed.
    chains = (_chain("default", plugin="FdPass"), _chain("open", "fail_open"))
    bootstrap = _bootstrap(chains, 1, RouteSpec("/"), RouteSpec("/open", "open"))
    for route in _hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]:
        overrides = route.get("typed_per_filter_config", {}).get(EXT_PROC, {}).get("overrides", {})
        assert "failure_mode_allow" not in overrides
    validate_bootstrap(bootstrap)


# ---- sidecar render / render --format eg ---------------------------------------------------------------

RESOURCES = (
    SIDECAR_ROUTE
    + """apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: ext}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: myapp}
  extProc:
  - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: envoy-sidecar}]
"""
)


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], on_error: str, text: str, *args: str) -> Any:
    """(exit code, the documents) or (exit code, stderr) of `sidecar render ... --sidecar-config`."""
    resources = tmp_path / "in.yaml"
    resources.write_text(text)
    sidecar = tmp_path / "sidecar.yaml"
    sidecar.write_text(f"workers: 2\nchains:\n  default: {{on_error: {on_error}, plugins: [header-stamp]}}\n")
    code = main(["render", "-f", str(resources), "--sidecar-config", str(sidecar), *args])
    captured = capsys.readouterr()
    return code, (list(yaml.safe_load_all(captured.out)) if code == 0 else captured.err)


def _with_ext_field(field: str) -> str:
    return RESOURCES.replace("name: envoy-sidecar}]\n", f"name: envoy-sidecar}}]\n    {field}\n")


def _rendered_ext_proc(bootstrap: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    listener = bootstrap["static_resources"]["listeners"][0]
    ext_proc = _ext_proc(listener["filter_chains"][0]["filters"][0]["typed_config"])
    name = ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name)
    return ext_proc, cluster


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_render_gives_the_sidecar_backend_the_same_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], on_error: str
) -> None:
    code, (bootstrap,) = _run(tmp_path, capsys, on_error, RESOURCES)
    assert code == 0
    ext_proc, cluster = _rendered_ext_proc(bootstrap)
    want = _bootstrap((_chain("default", on_error),), 2)
    want_cluster = want["static_resources"]["clusters"][0]
    for key in ("connect_timeout", "circuit_breakers", "health_checks", "outlier_detection"):
        assert cluster[key] == want_cluster[key], key
    assert ext_proc["grpc_service"]["retry_policy"] == _ext_proc(_hcm(want))["grpc_service"]["retry_policy"]
    assert ext_proc.get("failure_mode_allow", False) is (on_error == "fail_open")


@pytest.mark.parametrize("args", [(), ("--format", "eg")])
def test_fail_open_on_a_fail_closed_chain_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    code, err = _run(tmp_path, capsys, "fail_closed", _with_ext_field("failOpen: true"), *args)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "EnvoyExtensionPolicy/default/ext: spec.extProc[0].failOpen: true would let requests through" in err


def test_explicit_fail_closed_wins_over_a_fail_open_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _with_ext_field("failOpen: false")
    code, (bootstrap,) = _run(tmp_path, capsys, "fail_open", text)
    assert code == 0
    assert not _rendered_ext_proc(bootstrap)[0].get("failure_mode_allow", False)
    code, docs = _run(tmp_path, capsys, "fail_open", text, "--format", "eg")
    assert code == 0
    assert next(d for d in docs if d["kind"] == "EnvoyExtensionPolicy")["spec"]["extProc"][0]["failOpen"] is False


def test_render_refuses_backend_settings_for_its_own_sidecar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _with_ext_field("backendSettings: {circuitBreaker: {maxParallelRetries: 3}}")
    code, err = _run(tmp_path, capsys, "fail_closed", text)
    assert code == 2
    assert "spec.extProc[0].backendSettings: unsupported field for this sidecar's Backend" in err


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_bundle_writes_the_settings_as_eg_backend_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], on_error: str
) -> None:
    code, docs = _run(tmp_path, capsys, on_error, RESOURCES, "--format", "eg")
    assert code == 0
    policy = next(d for d in docs if d["kind"] == "EnvoyExtensionPolicy")
    (ext,) = policy["spec"]["extProc"]
    assert ext["backendSettings"] == eg_backend_settings(2)
    assert ext["failOpen"] is (on_error == "fail_open")
    assert ext["backendSettings"]["healthCheck"]["active"]["interval"] == "500ms"
    assert ext["backendSettings"]["timeout"]["tcp"]["connectTimeout"] == "250ms"
