"""Prometheus metrics of the fetcher, named and labelled as Envoy Gateway's (internal/wasm/metrics.go),
so EG dashboards and alerts work unchanged."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = ["CACHE_ENTRIES", "CACHE_LOOKUPS", "REMOTE_FETCHES"]

CACHE_ENTRIES = Gauge("wasm_cache_entries", "Number of Wasm modules in the cache.")
CACHE_LOOKUPS = Counter("wasm_cache_lookup", "Wasm module cache lookups, by whether they hit.", ["hit"])
REMOTE_FETCHES = Counter(
    "wasm_remote_fetch",
    "Remote Wasm module fetches, by result (success or the failure reason).",
    ["reason"],
)
