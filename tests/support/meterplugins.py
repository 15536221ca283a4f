"""Plugins that use the plugin metrics API (`sidecar.Counter`, `Gauge`, `Histogram`), for the metrics tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import prometheus_client

from sidecar import Context, Counter, Gauge, Headers, Histogram, Plugin, Respond

#: The spec prefix that names a plugin class of this module in a config file or `--plugin`.
MP = "tests.support.meterplugins:"

SEEN = Counter("test_requests_seen", "Requests the metered plugin saw, by verdict", labels=("verdict",))
LOADED = Gauge("test_plugins_loaded", "Metered plugin instances in this process")
SIZES = Histogram("test_path_bytes", "Length of :path", buckets=(4, 16, 64))
# What plugins wrote before sidecar.Counter existed: a worker publishes its registry for the supervisor.
LEGACY = prometheus_client.Counter("test_legacy_requests", "Requests, counted with prometheus_client", ["verdict"])
LEGACY_LATENCY = prometheus_client.Histogram("test_legacy_seconds", "A prometheus_client histogram", buckets=(1.0,))


class Metered(Plugin):
    """401 for `x-deny`, raises for `x-boom`, counts every request by verdict."""

    name = "metered"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        LOADED.inc()

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        SIZES.observe(len(headers.get(":path", "")))
        LEGACY.labels("any").inc()
        LEGACY_LATENCY.observe(0.5)
        if "x-boom" in headers:
            SEEN.inc(verdict="boom")
            raise RuntimeError("metered plugin asked to fail")
        if "x-deny" in headers:
            SEEN.inc(verdict="deny")
            return Respond(401, b"no\n")
        SEEN.inc(verdict="pass")
        return None
