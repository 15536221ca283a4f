"""Prometheus metrics of the ext_proc server.

Children for each phase are bound once, so recording a message costs two attribute lookups, not a label
lookup. With `--workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR and serves the sum.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from sidecar.errors import ConfigError
from sidecar.registry import PHASES

__all__ = ["Metrics", "serve_metrics"]

_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.streams = Counter("sidecar_extproc_streams", "ext_proc streams opened, by chain", ["chain"], **kw)
        self.active = Gauge(
            "sidecar_extproc_streams_active", "ext_proc streams open now", multiprocess_mode="livesum", **kw
        )
        messages = Counter("sidecar_extproc_messages", "ProcessingRequests handled, by phase", ["phase"], **kw)
        latency = Histogram(
            "sidecar_extproc_phase_seconds", "Time to answer one ProcessingRequest, by phase",
            ["phase"], buckets=_LATENCY_BUCKETS, **kw,
        )  # fmt: skip
        self.plugin_errors = Counter(
            "sidecar_plugin_errors", "Exceptions raised by plugin hooks", ["plugin", "phase"], **kw
        )
        self.stream_errors = Counter(
            "sidecar_extproc_stream_errors", "Streams failed with a gRPC error, by reason", ["reason"], **kw
        )
        self.phase = {p: (messages.labels(p), latency.labels(p)) for p in PHASES}
        self._streams_by_chain: dict[str, Any] = {}

    def stream_opened(self, chain: str) -> None:
        counter = self._streams_by_chain.get(chain)
        if counter is None:
            counter = self._streams_by_chain[chain] = self.streams.labels(chain)
        counter.inc()
        self.active.inc()

    def plugin_error(self, plugin: str, phase: str) -> None:
        self.plugin_errors.labels(plugin, phase).inc()


def serve_metrics(address: str, *, multiprocess_dir: str | None = None) -> int:
    """Serve /metrics on host:port in a background thread; return the bound port."""
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit():
        raise ConfigError(f"metrics: expected HOST:PORT, got {address!r}")
    registry = REGISTRY
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    try:
        server, _thread = start_http_server(int(port_text), addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        raise ConfigError(f"metrics: cannot listen on {address}: {exc.strerror}") from None
    return int(server.server_port)
