from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from sidecar.extproc.metrics import Metrics, MetricsCollector, read_snapshots


def scrape(source: Metrics | dict[str, object]) -> str:
    registry = CollectorRegistry()
    registry.register(MetricsCollector(source.snapshot if isinstance(source, Metrics) else lambda: source))
    return generate_latest(registry).decode()


def test_counts_and_histogram_exposition() -> None:
    metrics = Metrics()
    metrics.stream_opened("default")
    metrics.stream_opened("default")
    metrics.stream_closed()
    metrics.observe("request_headers", 0.0003)
    metrics.observe("request_headers", 2.0)
    metrics.plugin_error("redact", "request_body")
    metrics.stream_error("protocol")
    text = scrape(metrics)
    assert 'sidecar_extproc_streams_total{chain="default"} 2.0' in text
    assert "sidecar_extproc_streams_active 1.0" in text
    assert 'sidecar_extproc_messages_total{phase="request_headers"} 2.0' in text
    assert 'sidecar_extproc_phase_seconds_bucket{le="0.00025",phase="request_headers"} 0.0' in text
    assert 'sidecar_extproc_phase_seconds_bucket{le="0.0005",phase="request_headers"} 1.0' in text
    assert 'sidecar_extproc_phase_seconds_bucket{le="1.0",phase="request_headers"} 1.0' in text
    assert 'sidecar_extproc_phase_seconds_bucket{le="+Inf",phase="request_headers"} 2.0' in text
    assert 'sidecar_extproc_phase_seconds_sum{phase="request_headers"} 2.0003' in text
    assert 'sidecar_plugin_errors_total{phase="request_body",plugin="redact"} 1.0' in text
    assert 'sidecar_extproc_stream_errors_total{reason="protocol"} 1.0' in text


def test_worker_snapshots_sum_and_dead_workers_keep_their_counts(tmp_path: Path) -> None:
    live, dead = Metrics(), Metrics()
    for metrics, n in ((live, 3), (dead, 4)):
        for _ in range(n):
            metrics.stream_opened("default")
            metrics.observe("response_headers", 0.001)
    live.write_snapshot(tmp_path / "100.json")
    dead.write_snapshot(tmp_path / "200.json")
    (tmp_path / "300.json").write_text("{half a file")  # being replaced: skipped, not fatal
    total = read_snapshots(tmp_path, live_pids={100})
    assert total["streams"] == {"default": 7}
    assert total["active"] == 3  # the dead worker's open streams are gone
    assert sum(total["latency"]["response_headers"]) == 7
    assert json.loads((tmp_path / "100.json").read_text())["active"] == 3
    assert 'sidecar_extproc_streams_total{chain="default"} 7.0' in scrape(total)
