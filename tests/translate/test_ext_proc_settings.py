"""extProc `backendSettings` on a backend that is not this sidecar: rendered as EG renders them.

The gRPC stream's retry policy is compared with EG's own xDS for the same settings
(`xds-testdata/ext-proc-with-retries`); the cluster settings with EG's xDS translator rules and its CRD
defaults; bad back-offs are refused naming the field, as EG refuses the policy.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.errors import ConfigError
from sidecar.stack.envoy import validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_egxds import XDS
from tests.support.translate_kit import BASE

POLICY = {
    "apiVersion": "gateway.envoyproxy.io/v1alpha1",
    "kind": "EnvoyExtensionPolicy",
    "metadata": {"name": "ext"},
    "spec": {
        "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "app"}],
        "extProc": [{"backendRefs": [{"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "app"}]}],
    },
}


def _render(tmp_path: Path, settings: dict[str, Any], validate: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    policy = yaml.safe_load(yaml.safe_dump(POLICY))
    policy["spec"]["extProc"][0]["backendSettings"] = settings
    path = tmp_path / "in.yaml"
    path.write_text(BASE + "---\n" + yaml.safe_dump(policy))
    bootstrap = render_bootstrap([path], RenderOptions(ephemeral_ports=True))
    if validate:
        validate_bootstrap(bootstrap)  # real Envoy takes every field as written
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext = next(f for f in hcm["http_filters"] if f["name"].startswith("envoy.filters.http.ext_proc"))
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"].startswith("envoyextension"))
    return ext["typed_config"], cluster


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


@pytest.mark.skipif(not XDS.is_dir(), reason="EG xds-testdata (../shared) not present")
def test_the_stream_retry_policy_is_egs(tmp_path: Path) -> None:
    retry = {
        "numRetries": 2,
        "perRetry": {"backOff": {"baseInterval": "200ms", "maxInterval": "3s"}},
        "retryOn": {"triggers": ["5xx", "deadline-exceeded", "internal", "unavailable"]},
    }
    listeners = yaml.safe_load((XDS / "ext-proc-with-retries.listeners.yaml").read_text())
    text = yaml.safe_dump(listeners)
    egs = yaml.safe_load(text[text.index("retryPolicy:") :].split("timeout:")[0].replace("retryPolicy:", "", 1))
    ext, _ = _render(tmp_path, {"retry": retry}, validate=True)
    ours = ext["grpc_service"]["retry_policy"]
    assert ours["retry_on"] == egs["retryOn"]
    assert ours["num_retries"] == egs["numRetries"]
    for field, eg_field in (("base_interval", "baseInterval"), ("max_interval", "maxInterval")):
        assert _seconds(ours["retry_back_off"][field]) == _seconds(egs["retryBackOff"][eg_field])


def test_retry_defaults_are_egs(tmp_path: Path) -> None:
    ext, _ = _render(tmp_path, {"retry": {}})
    policy = ext["grpc_service"]["retry_policy"]
    assert policy["num_retries"] == 2  # the CRD's default
    assert policy["retry_on"] == "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    assert "retry_back_off" not in policy


def test_cluster_settings_are_egs(tmp_path: Path) -> None:
    settings = {
        "timeout": {"tcp": {"connectTimeout": "15s"}},
        "circuitBreaker": {"maxParallelRetries": 7},
        "healthCheck": {
            "active": {"type": "GRPC", "grpc": {"service": "svc"}, "interval": "5s", "unhealthyThreshold": 2},
            "passive": {"consecutiveGatewayErrors": 4, "interval": "5s"},
        },
    }
    ext, cluster = _render(tmp_path, settings, validate=True)
    assert "retry_policy" not in ext["grpc_service"]  # no retry asked: EG sets none
    assert _seconds(cluster["connect_timeout"]) == 15
    assert cluster["circuit_breakers"]["thresholds"][0]["max_retries"] == 7
    (check,) = cluster["health_checks"]
    assert (_seconds(check["interval"]), _seconds(check["timeout"])) == (5, 1)  # timeout: the CRD default
    assert (check["unhealthy_threshold"], check["healthy_threshold"]) == (2, 1)
    assert check["grpc_health_check"] == {"service_name": "svc"}
    detection = cluster["outlier_detection"]
    assert detection["consecutive_gateway_failure"] == 4 and detection["enforcing_consecutive_gateway_failure"] == 100
    assert (detection["consecutive_5xx"], detection["consecutive_local_origin_failure"]) == (5, 5)
    assert _seconds(detection["base_ejection_time"]) == 30 and detection["max_ejection_percent"] == 10
    assert _seconds(detection["interval"]) == 5


def test_without_settings_the_cluster_is_unchanged(tmp_path: Path) -> None:
    _, plain = _render(tmp_path, {})
    assert not {"health_checks", "outlier_detection", "circuit_breakers"} & set(plain)
    assert datetime.timedelta(seconds=_seconds(plain["connect_timeout"])) == datetime.timedelta(seconds=10)


@pytest.mark.parametrize(
    ("back_off", "field", "says"),
    [
        ({"baseInterval": "0s", "maxInterval": "1s"}, "baseInterval", "zero interval"),
        ({"baseInterval": "1s", "maxInterval": "0ms"}, "maxInterval", "zero interval"),
        ({"baseInterval": "2s", "maxInterval": "1s"}, "maxInterval", "less than baseInterval"),
        ({"maxInterval": "1s"}, "baseInterval", "required"),
    ],
)
def test_a_back_off_eg_refuses_is_refused(tmp_path: Path, back_off: dict[str, str], field: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _render(tmp_path, {"retry": {"perRetry": {"backOff": back_off}}})
    message = str(refused.value)
    assert (
        f"EnvoyExtensionPolicy/default/ext: spec.extProc[0].backendSettings.retry.perRetry.backOff.{field}" in message
    )
    assert says in message
