"""Prometheus metrics of the ext_proc server.

The hot path only bumps plain numbers (no locks, no label lookups, no prometheus_client objects); a
Collector turns a snapshot of them into metric families when Prometheus scrapes. With `--workers N`
each worker writes its snapshot to a file every second and the supervisor serves the sum, so nothing
depends on prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import json
import os
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sidecar.config import parse_host_port
from sidecar.errors import ConfigError
from sidecar.wire import PHASES

__all__ = ["Metrics", "MetricsCollector", "Snapshot", "merge", "read_snapshots", "serve_metrics"]

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)

Snapshot = dict[str, Any]


class Metrics:
    """The numbers one serving process keeps."""

    def __init__(self) -> None:
        self.streams: dict[str, int] = {}
        self.active = 0
        # Per phase: a count per bucket (the last one is +Inf) and the sum of seconds.
        self.latency: dict[str, list[int]] = {phase: [0] * (len(BUCKETS) + 1) for phase in PHASES}
        self.latency_sum: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.plugin_errors: dict[str, int] = {}  # "plugin\0phase" -> count
        self.stream_errors: dict[str, int] = {}

    def stream_opened(self, chain: str) -> None:
        self.streams[chain] = self.streams.get(chain, 0) + 1
        self.active += 1

    def stream_closed(self) -> None:
        self.active -= 1

    def observe(self, phase: str, seconds: float) -> None:
        self.latency[phase][bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum[phase] += seconds

    def plugin_error(self, plugin: str, phase: str) -> None:
        key = f"{plugin}\0{phase}"
        self.plugin_errors[key] = self.plugin_errors.get(key, 0) + 1

    def stream_error(self, reason: str) -> None:
        self.stream_errors[reason] = self.stream_errors.get(reason, 0) + 1

    def snapshot(self) -> Snapshot:
        return {
            "streams": dict(self.streams),
            "active": self.active,
            "latency": {phase: list(counts) for phase, counts in self.latency.items()},
            "latency_sum": dict(self.latency_sum),
            "plugin_errors": dict(self.plugin_errors),
            "stream_errors": dict(self.stream_errors),
        }

    def write_snapshot(self, path: Path) -> None:
        """Atomically replace `path` with the current snapshot (for the supervisor to sum)."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".snapshot-")
        with os.fdopen(fd, "w") as out:
            json.dump(self.snapshot(), out)
        os.replace(tmp, path)


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Counters and histograms summed; `active` only from the snapshots marked live."""
    total = Metrics().snapshot()
    for snap in snapshots:
        _add(total["streams"], snap["streams"])
        _add(total["plugin_errors"], snap["plugin_errors"])
        _add(total["stream_errors"], snap["stream_errors"])
        _add(total["latency_sum"], snap["latency_sum"])
        for phase, counts in snap["latency"].items():
            total["latency"][phase] = [a + b for a, b in zip(total["latency"][phase], counts, strict=True)]
        if snap.get("live", True):
            total["active"] += snap["active"]
    return total


def read_snapshots(directory: Path, live_pids: set[int]) -> Snapshot:
    """The sum of the workers' snapshot files (`<pid>.json`); dead workers still count for counters."""
    snapshots = []
    for path in directory.glob("*.json"):
        try:
            snap = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now; the next scrape gets it
        snap["live"] = path.stem.isdigit() and int(path.stem) in live_pids
        snapshots.append(snap)
    return merge(snapshots)


class MetricsCollector(Collector):
    """Exposes a snapshot (of this process, or summed over workers) as Prometheus metric families."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        snap = self._source()
        streams = CounterMetricFamily("sidecar_extproc_streams", "ext_proc streams opened, by chain", labels=["chain"])
        for chain, count in sorted(snap["streams"].items()):
            streams.add_metric([chain], count)
        yield streams
        yield GaugeMetricFamily("sidecar_extproc_streams_active", "ext_proc streams open now", value=snap["active"])
        messages = CounterMetricFamily(
            "sidecar_extproc_messages", "ProcessingRequests handled, by phase", labels=["phase"]
        )
        latency = HistogramMetricFamily(
            "sidecar_extproc_phase_seconds", "Time to answer one ProcessingRequest, by phase", labels=["phase"]
        )
        for phase in PHASES:
            counts = snap["latency"][phase]
            messages.add_metric([phase], sum(counts))
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([phase], buckets, snap["latency_sum"][phase])
        yield messages
        yield latency
        errors = CounterMetricFamily(
            "sidecar_plugin_errors", "Exceptions raised by plugin hooks", labels=["plugin", "phase"]
        )
        for key, count in sorted(snap["plugin_errors"].items()):
            errors.add_metric(key.split("\0", 1), count)
        yield errors
        failed = CounterMetricFamily(
            "sidecar_extproc_stream_errors", "Streams failed with a gRPC error, by reason", labels=["reason"]
        )
        for reason, count in sorted(snap["stream_errors"].items()):
            failed.add_metric([reason], count)
        yield failed


def serve_metrics(address: str, source: Callable[[], Snapshot]) -> int:
    """Serve /metrics on host:port in a background thread; return the bound port."""
    host, port = parse_host_port(address, "metrics")
    REGISTRY.register(MetricsCollector(source))
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(f"metrics: cannot listen on {address}: {exc.strerror}") from None
    return int(server.server_port)
