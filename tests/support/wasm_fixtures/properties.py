"""The property paths the differential suite has the probe module read (docs/wasm-host.md lists each)."""

from __future__ import annotations

# Every property a module can read, as dotted paths (the probe sends them NUL-separated, as SDKs do).
# fmt: off
PROPERTIES = [
    "request.path", "request.url_path", "request.host", "request.scheme", "request.method", "request.headers",
    "request.referer", "request.useragent", "request.time", "request.id", "request.protocol", "request.query",
    "request.duration", "request.size", "request.total_size", "request.headers.x-tag", "request.headers.x-missing",
    "response.code", "response.code_details", "response.flags", "response.grpc_status", "response.headers",
    "response.headers.x-echo", "response.trailers", "response.size", "response.total_size",
    "response.backend_latency", "source.address", "source.port", "destination.address", "destination.port",
    "connection.id", "connection.mtls", "connection.requested_server_name", "connection.tls_version",
    "connection.termination_details", "connection.transport_failure_reason", "upstream.address", "upstream.port",
    "upstream.local_address", "upstream.transport_failure_reason", "upstream.request_attempt_count",
    "upstream.tls_version", "xds.cluster_name", "xds.route_name", "xds.listener_direction", "xds.virtual_host_name",
    "xds.node", "xds.cluster_metadata", "xds.route_metadata", "xds.listener_metadata", "xds.upstream_host_metadata",
    "xds.filter_chain_name", "plugin_name", "plugin_root_id", "plugin_vm_id", "node", "cluster_name", "route_name",
    "listener_direction", "cluster_metadata", "route_metadata", "listener_metadata", "upstream_host_metadata",
    "metadata", "filter_state", "connection_id", "request", "response", "source", "destination", "upstream",
    "connection", "xds",
]
# fmt: on
