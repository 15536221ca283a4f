"""The Grafana dashboard shipped with the chart: it queries only metrics the sidecar exposes, and the chart
ships it as a ConfigMap only when `dashboard.enabled`."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, generate_latest

from sidecar import Respond
from sidecar.extproc.metrics import Metrics, MetricsCollector, merge
from tests.support.helm import CHART, Render

DASHBOARD = CHART / "dashboards" / "envoy-sidecar.json"


def _exposed() -> set[str]:
    """Every sample name a supervisor's scrape can show, each family with data."""
    metrics = Metrics()
    metrics.stream_opened("default")
    metrics.observe("request_headers", 0.001)
    metrics.plugin_ran("auth", "request_headers", 0.001, Respond(401))
    metrics.plugin_error("auth", "request_headers")
    metrics.stream_error("cancelled")
    total = merge([metrics.snapshot()])
    total["restarts"] = 1
    registry = CollectorRegistry()
    registry.register(MetricsCollector(lambda: total))
    text = generate_latest(registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    # A family with no samples yet (no plugin metric dropped anything) is exposed by its TYPE line.
    suffix = {"counter": "_total", "histogram": "_bucket", "gauge": ""}
    types = re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text)
    return names | {name.removesuffix("_total") + suffix.get(kind, "") for name, kind in types}


def test_the_dashboard_queries_only_metrics_the_sidecar_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\bsidecar_[a-z_]+", expr)}
    assert queried and queried <= _exposed(), queried - _exposed()
    assert {
        "sidecar_plugin_seconds_bucket",
        "sidecar_plugin_responses_total",
        "sidecar_worker_restarts_total",
    } <= queried
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_chart_ships_the_dashboard_only_when_asked(render: Render) -> None:
    def dashboards(docs: list[dict[str, object]]) -> list[dict[str, object]]:
        return [d for d in docs if d["kind"] == "ConfigMap" and str(d["metadata"]["name"]).endswith("-dashboard")]  # type: ignore[index]

    values = CHART / "ci" / "standalone-values.yaml"
    assert dashboards(render(values)) == []
    (configmap,) = dashboards(render(values, sets={"dashboard.enabled": "true", "dashboard.labels.team": "edge"}))
    metadata = configmap["metadata"]
    assert metadata["labels"]["grafana_dashboard"] == "1"  # type: ignore[index]
    assert metadata["labels"]["team"] == "edge"  # type: ignore[index]
    assert json.loads(configmap["data"]["envoy-sidecar.json"]) == json.loads(DASHBOARD.read_text())  # type: ignore[index]
