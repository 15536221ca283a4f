"""The contract between the ext_proc server and the Envoy config that calls it.

Both sides of the wire read these names from here: the server (which serves the method and reads the
chain metadata) and the translator and config writers (which name the service in health checks, pass
the chain as gRPC initial metadata and let plugins write the metadata namespace). Nothing here imports
anything of the project, so the translator can use them without loading the gRPC server.
"""

from __future__ import annotations

__all__ = ["CHAIN_METADATA_KEY", "METADATA_NAMESPACE", "PHASES", "PROCESS_METHOD", "SERVICE_NAME"]

#: The gRPC service Envoy's ext_proc filter calls, and the name its health checks ask about.
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
#: The one method of that service: a bidirectional stream per HTTP request.
PROCESS_METHOD = f"/{SERVICE_NAME}/Process"
#: gRPC initial metadata naming the chain a route uses (Envoy's `grpc_initial_metadata`).
CHAIN_METADATA_KEY = "x-sidecar-chain"
#: The dynamic-metadata namespace plugins write to, and the one Envoy is told to accept from the sidecar.
METADATA_NAMESPACE = "envoy-sidecar"
#: The six points of an HTTP exchange ext_proc can see, in the order Envoy sends them.
PHASES = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
)
