"""Prometheus metrics of the ext_proc server.

The hot path only bumps plain numbers (no locks, no label lookups, no prometheus_client objects); a
Collector turns a snapshot of them into metric families when Prometheus scrapes. With `--workers N`
each worker writes its snapshot to a file every second and the supervisor serves the sum, so nothing
depends on prometheus_client's multiprocess mode. A snapshot also carries the plugins' own instruments
(`sidecar.instruments`) and the process's RSS, CPU and open fds, shown per worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import instruments
from sidecar.config import parse_host_port
from sidecar.errors import ConfigError
from sidecar.plugins import Respond
from sidecar.wire import PHASES

__all__ = [
    "Metrics",
    "MetricsCollector",
    "Snapshot",
    "fold_retired",
    "merge",
    "process_usage",
    "read_snapshots",
    "serve_metrics",
    "write_snapshot",
]

log = logging.getLogger("sidecar.metrics")

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)

Snapshot = dict[str, Any]
#: Samples of a worker's own prometheus_client registry (a plugin's Counter...) it publishes; more are dropped.
MAX_REGISTRY_SAMPLES = 10_000
# Per process, not summable: prometheus_client's default collectors describe the supervisor itself.
_PER_PROCESS = ("process_", "python_", "sidecar_")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: Seconds between warnings about a plugin's collector that raises (it raises on every publish).
_WARN_EVERY = 60.0
_last_warned = [float("-inf")]
#: The file a supervisor folds its dead workers' snapshots into (not a pid: never live).
RETIRED = "retired.json"


def process_usage() -> dict[str, float]:
    """This process's resident memory (bytes), CPU time (seconds) and open file descriptors."""
    times = os.times()
    usage = {"cpu_seconds": times.user + times.system, "resident_bytes": 0.0, "open_fds": 0.0}
    try:
        usage["resident_bytes"] = float(int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE)
        usage["open_fds"] = float(len(os.listdir("/proc/self/fd")))
    except (OSError, ValueError, IndexError):  # not Linux: the CPU time is still right
        pass
    return usage


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
        # (plugin, phase) -> a count per bucket, +Inf, then the sum of seconds: one hook call each.
        self.plugin_latency: dict[tuple[str, str], list[float]] = {}
        self.responses: dict[tuple[str, int], int] = {}  # (plugin, status) -> Responds returned
        #: Which worker this process is ("0" alone); labels its process metrics.
        self.worker = "0"
        #: A worker publishes what plugins registered with prometheus_client too (nobody scrapes a worker).
        self.publish_registry = False

    def stream_opened(self, chain: str) -> None:
        self.streams[chain] = self.streams.get(chain, 0) + 1
        self.active += 1

    def stream_closed(self) -> None:
        self.active -= 1

    def observe(self, phase: str, seconds: float) -> None:
        self.latency[phase][bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum[phase] += seconds

    def plugin_error(self, plugin: str, phase: str, error_id: str = "") -> None:
        key = f"{plugin}\0{phase}"
        self.plugin_errors[key] = self.plugin_errors.get(key, 0) + 1

    def plugin_ran(self, plugin: str, phase: str, seconds: float, outcome: object = None) -> None:
        """One hook call took `seconds`; `outcome` is what it ended with (None, a Respond, an exception)."""
        counts = self.plugin_latency.get((plugin, phase))
        if counts is None:
            counts = self.plugin_latency[(plugin, phase)] = [0] * (len(BUCKETS) + 1) + [0.0]
        counts[bisect_left(BUCKETS, seconds)] += 1
        counts[-1] += seconds
        if isinstance(outcome, Respond):  # the client got this status from this plugin
            key = (plugin, outcome.status)
            self.responses[key] = self.responses.get(key, 0) + 1

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
            "plugin_latency": {f"{p}\0{ph}": list(counts) for (p, ph), counts in self.plugin_latency.items()},
            "responses": {f"{p}\0{status}": count for (p, status), count in self.responses.items()},
            "processes": {self.worker: process_usage()},
            "instruments": instruments.snapshot(),
            "registry": registry_samples() if self.publish_registry else {},
        }

    def write_snapshot(self, path: Path) -> None:
        """Atomically replace `path` with the current snapshot (for the supervisor to sum)."""
        write_snapshot(path, self.snapshot())


def write_snapshot(path: Path, snap: Snapshot) -> None:
    """Atomically replace `path` with `snap` (plain data, so another thread may serialise it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".snapshot-")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(snap, out)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _collected_families() -> Iterator[Any]:
    """The families of every collector in the default registry; a collector that raises (a plugin's
    Gauge.set_function callback, say) is left out with a warning, never the others with it."""
    with REGISTRY._lock:  # a copy: another thread may register meanwhile
        collectors = list(REGISTRY._collector_to_names)
    for collector in collectors:
        try:
            families = list(collector.collect())
        except Exception as exc:
            now = time.monotonic()
            if now - _last_warned[0] >= _WARN_EVERY:
                _last_warned[0] = now
                log.warning("metrics: a prometheus_client collector raised; its metrics are left out: %r", exc)
            continue
        yield from families


def registry_samples() -> dict[str, Any]:
    """This process's prometheus_client registry (what plugins registered there) as plain data:
    family -> type, help, and {sample name + labels (JSON): value}. Bounded by MAX_REGISTRY_SAMPLES."""
    families: dict[str, Any] = {}
    count = 0
    for family in _collected_families():
        if family.name.startswith(_PER_PROCESS):
            continue
        samples: dict[str, float] = {}
        for sample in family.samples:
            if sample.name.endswith("_created") or count >= MAX_REGISTRY_SAMPLES:
                continue  # a creation time is no sum; past the bound the rest is dropped
            samples[json.dumps([sample.name, sample.labels], sort_keys=True)] = sample.value
            count += 1
        families[family.name] = {"type": family.type, "help": family.documentation, "samples": samples}
    return families


def _add_registry(total: dict[str, Any], part: dict[str, Any], live: bool) -> None:
    """Counters, histograms and summaries summed over every worker, gauges over the live ones."""
    for name, family in part.items():
        mine = total.setdefault(name, {"type": family["type"], "help": family["help"], "samples": {}})
        if mine["type"] != family["type"] or (family["type"] == "gauge" and not live):
            continue
        if family["type"] in ("counter", "gauge", "histogram", "summary", "untyped", "unknown"):
            _add(mine["samples"], family["samples"])
        else:  # info, stateset, enum: a value, not an amount
            mine["samples"].update(family["samples"])


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def _add_lists(total: dict[str, list[float]], part: dict[str, list[float]]) -> None:
    for key, counts in part.items():
        mine = total.get(key)
        total[key] = list(counts) if mine is None else [a + b for a, b in zip(mine, counts, strict=True)]


def _add_instruments(total: dict[str, Any], part: dict[str, Any], live: bool) -> None:
    """Counters and histograms summed over every worker; gauges over the live ones."""
    for name, declared in part.items():
        mine = total.get(name)
        if mine is None:
            mine = total[name] = {**declared, "series": {}, "dropped": 0}
        elif (mine["kind"], mine["labels"], mine.get("buckets")) != (
            declared["kind"],
            declared["labels"],
            declared.get("buckets"),
        ):
            continue  # workers disagree (a restart with other code): keep the first declaration
        mine["dropped"] += declared["dropped"]
        if declared["kind"] == "gauge" and not live:
            continue
        if declared["kind"] == "histogram":
            _add_lists(mine["series"], declared["series"])
        else:
            _add(mine["series"], declared["series"])


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Counters and histograms summed; `active`, gauges and process metrics only from the live snapshots."""
    total = Metrics().snapshot()
    total["processes"] = {}
    total["instruments"] = {}
    total["registry"] = {}
    for snap in snapshots:
        live = snap.get("live", True)
        _add(total["streams"], snap["streams"])
        _add(total["plugin_errors"], snap["plugin_errors"])
        _add(total["stream_errors"], snap["stream_errors"])
        _add(total["latency_sum"], snap["latency_sum"])
        for phase, counts in snap["latency"].items():
            total["latency"][phase] = [a + b for a, b in zip(total["latency"][phase], counts, strict=True)]
        _add_lists(total["plugin_latency"], snap.get("plugin_latency", {}))
        _add(total["responses"], snap.get("responses", {}))
        _add_instruments(total["instruments"], snap.get("instruments", {}), live)
        _add_registry(total["registry"], snap.get("registry", {}), live)
        if live:
            total["active"] += snap["active"]
            total["processes"].update(snap.get("processes", {}))
    return total


def fold_retired(directory: Path, live_pids: set[int]) -> None:
    """Fold the snapshots of workers that exited into one file (RETIRED), so restarts do not pile up
    files the supervisor reads on every scrape. Their counters still count; their gauges did not."""
    dead = [path for path in directory.glob("*.json") if path.stem.isdigit() and int(path.stem) not in live_pids]
    if not dead:
        return
    retired = directory / RETIRED
    snapshots = []
    for path in [retired, *dead]:
        try:
            snapshots.append({**json.loads(path.read_text()), "live": False})
        except (OSError, ValueError):
            continue  # none yet, or a worker killed mid-write (its temporary file is never a .json)
    write_snapshot(retired, merge(snapshots))
    for path in dead:
        with contextlib.suppress(OSError):
            path.unlink()


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
        yield from _plugin_families(snap)
        yield from _process_families(snap)
        yield from _instrument_families(snap.get("instruments", {}))
        yield from _registry_families(snap.get("registry", {}))


def _registry_families(families: dict[str, Any]) -> Iterator[Any]:
    """The workers' prometheus_client metrics, summed (only a supervisor's snapshot has any)."""
    for name, family in sorted(families.items()):
        metric = Metric(name, family["help"], family["type"])
        for key, value in sorted(family["samples"].items()):
            sample_name, labels = json.loads(key)
            metric.add_sample(sample_name, labels, value)
        yield metric


def _histogram(family: HistogramMetricFamily, labels: list[str], bounds: Iterable[float], counts: list[float]) -> None:
    """`counts`: one per bucket, +Inf, then the sum."""
    cumulative, buckets = 0.0, []
    for bound, count in zip([*map(str, bounds), "+Inf"], counts[:-1], strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    family.add_metric(labels, buckets, counts[-1])


def _plugin_families(snap: Snapshot) -> Iterator[Any]:
    latency = HistogramMetricFamily(
        "sidecar_plugin_seconds", "Time one plugin hook took, by plugin and phase", labels=["plugin", "phase"]
    )
    for key, counts in sorted(snap.get("plugin_latency", {}).items()):
        _histogram(latency, key.split("\0", 1), BUCKETS, counts)
    yield latency
    responses = CounterMetricFamily(
        "sidecar_plugin_responses",
        "Immediate responses plugins returned (Respond), by plugin and HTTP status",
        labels=["plugin", "status"],
    )
    for key, count in sorted(snap.get("responses", {}).items()):
        responses.add_metric(key.split("\0", 1), count)
    yield responses


def _process_families(snap: Snapshot) -> Iterator[Any]:
    families: dict[str, Any] = {
        "resident_bytes": GaugeMetricFamily(
            "sidecar_worker_resident_memory_bytes", "Resident memory of each serving process", labels=["worker"]
        ),
        "cpu_seconds": CounterMetricFamily(
            "sidecar_worker_cpu_seconds", "CPU time (user + system) of each serving process", labels=["worker"]
        ),
        "open_fds": GaugeMetricFamily(
            "sidecar_worker_open_fds", "Open file descriptors of each serving process", labels=["worker"]
        ),
    }
    for worker, usage in sorted(snap.get("processes", {}).items()):
        for field, family in families.items():
            family.add_metric([worker], usage.get(field, 0.0))
    yield from families.values()
    if "restarts" in snap:
        yield CounterMetricFamily(
            "sidecar_worker_restarts", "Worker processes restarted after they exited", value=snap["restarts"]
        )


def _instrument_families(declared: dict[str, Any]) -> Iterator[Any]:
    dropped = CounterMetricFamily(
        "sidecar_plugin_metric_series_dropped",
        f"Plugin metric updates dropped: the metric already had {instruments.MAX_SERIES} label sets",
        labels=["metric"],
    )
    for name, spec in sorted(declared.items()):
        labels = list(spec["labels"])
        family: Any
        if spec["kind"] == "counter":
            family = CounterMetricFamily(name, spec["help"], labels=labels)
        elif spec["kind"] == "gauge":
            family = GaugeMetricFamily(name, spec["help"], labels=labels)
        else:
            family = HistogramMetricFamily(name, spec["help"], labels=labels)
        for key, value in sorted(spec["series"].items()):
            values = json.loads(key) if labels else []
            if spec["kind"] == "histogram":
                _histogram(family, values, spec["buckets"], value)
            else:
                family.add_metric(values, value)
        yield family
        if spec["dropped"]:
            dropped.add_metric([name], spec["dropped"])
    yield dropped


def serve_metrics(address: str, source: Callable[[], Snapshot], *, supervisor: bool = False) -> int:
    """Serve /metrics on host:port in a background thread; return the bound port.

    A supervisor serves a registry of its own: the default one holds the plugins' prometheus_client
    metrics as the supervisor loaded them (never used, all zero), while the workers' sums come in the
    snapshots."""
    host, port = parse_host_port(address, "metrics")
    registry = REGISTRY
    if supervisor:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    registry.register(MetricsCollector(source))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"metrics: cannot listen on {address}: {exc.strerror}") from None
    return int(server.server_port)
