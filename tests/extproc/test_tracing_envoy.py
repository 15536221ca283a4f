"""Tracing end to end: a real Envoy with its OpenTelemetry tracer on and the sidecar with `--tracing` both
export to one OTLP gRPC receiver run by the test; one trace holds both, linked parent to child."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sidecar.chains import load_sidecar
from sidecar.testing import EnvoyHarness
from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap
from tests.support.meterplugins import MP
from tests.support.otlp import Receiver, otlp_receiver
from tests.support.testplugins import TP
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

PLUGINS = [f"{MP}Metered", f"{TP}AddHeaders"]
ENVOY_CONFIG = [sys.executable, "-m", "sidecar", "envoy-config", "--plugin", f"{TP}AddHeaders"]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    with otlp_receiver() as running:
        yield running


def _envoy_tracing(port: int) -> Callable[[dict[str, Any]], None]:
    """What `sidecar envoy-config --otlp-endpoint` writes, put into the harness's bootstrap."""
    config, registry = load_sidecar(None, PLUGINS)
    traced = build_bootstrap(registry, config, BootstrapOptions(otlp_endpoint=("127.0.0.1", port)))
    hcm = traced["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (collector,) = [c for c in traced["static_resources"]["clusters"] if c["name"] == "otlp-collector"]

    def hook(bootstrap: dict[str, Any]) -> None:
        listener = bootstrap["static_resources"]["listeners"][0]
        listener["filter_chains"][0]["filters"][0]["typed_config"]["tracing"] = hcm["tracing"]
        bootstrap["static_resources"]["clusters"].append(collector)

    return hook


def test_one_trace_holds_envoys_spans_and_the_sidecars(
    sidecar_envoy: Callable[..., EnvoyHarness],
    receiver: tuple[Receiver, int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    spans, port = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    harness = sidecar_envoy(plugins=PLUGINS, serve_args=["--tracing"], bootstrap_hook=_envoy_tracing(port))
    for i in range(6):
        headers = {"x-deny": "1"} if i == 0 else {}
        response = httpx.get(harness.url + f"/item/{i}", headers=headers, timeout=10)
        assert response.status_code == (401 if i == 0 else 200)

    def both_sides() -> bool:
        # Envoy flushes in groups of 5 spans or every 5 s: its last spans may come a little later.
        envoy_ids = {span.span_id for span in spans.of("envoy")}
        streams = [s for s in spans.of("envoy-sidecar") if s.name == "ext_proc default"]
        return len(streams) == 6 and all(s.parent_span_id in envoy_ids for s in streams)

    wait_for(both_sides, timeout=20, what="Envoy's and the sidecar's spans at the receiver")
    envoy_spans = {span.span_id: span for span in spans.of("envoy")}
    sidecar_spans = {span.span_id: span for span in spans.of("envoy-sidecar")}
    streams = [span for span in sidecar_spans.values() if span.name == "ext_proc default"]
    for stream in streams:
        parent = envoy_spans.get(stream.parent_span_id)
        assert parent is not None, "the sidecar's stream span hangs under one of Envoy's spans"
        assert parent.trace_id == stream.trace_id
        # Envoy's chain above it goes up to the request's root span, all in the same trace.
        while parent.parent_span_id:
            parent = envoy_spans[parent.parent_span_id]
            assert parent.trace_id == stream.trace_id
        phases = [s for s in sidecar_spans.values() if s.parent_span_id == stream.span_id]
        assert {p.name for p in phases} >= {"request_headers"}
        for phase in phases:
            assert phase.trace_id == stream.trace_id
            children = [s for s in sidecar_spans.values() if s.parent_span_id == phase.span_id]
            assert children and all(c.trace_id == stream.trace_id for c in children)
    attributes = [{a.key: a.value for a in s.attributes} for s in streams]
    denied = [a for a in attributes if a["sidecar.outcome"].string_value == "respond"]
    assert len(denied) == 1 and denied[0]["sidecar.respond.status"].int_value == 401
    assert len({s.trace_id for s in streams}) == len(streams)  # one trace per request


@pytest.mark.parametrize("value", ["127.0.0.1", "collector:notaport", ":4317", "127.0.0.1:99999", ""])
def test_envoy_config_refuses_an_otlp_endpoint_that_cannot_work(value: str) -> None:
    proc = subprocess.run(
        [*ENVOY_CONFIG, "--otlp-endpoint", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("sidecar: error: --otlp-endpoint") and "Traceback" not in proc.stderr
    assert proc.stdout == ""  # nothing half-written


def test_envoy_config_with_an_otlp_endpoint_is_valid_for_envoy() -> None:
    proc = subprocess.run(
        [*ENVOY_CONFIG, "--otlp-endpoint", "127.0.0.1:4317", "--validate"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    bootstrap = yaml.safe_load(proc.stdout)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
    (collector,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "otlp-collector"]
    address = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "127.0.0.1", "port_value": 4317}
