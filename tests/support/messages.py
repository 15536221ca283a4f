"""ext_proc messages the server tests send, as Envoy would."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb


def headers_message(*pairs: tuple[str, bytes]) -> pb.ProcessingRequest:
    """A request_headers message with these (name, raw value) pairs."""
    header_map = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs])
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map))
