"""One ext_proc stream: ProcessingRequest in, the matching ProcessingResponse out.

This is the hot path. It knows nothing about gRPC, so the in-process test driver (`sidecar.testing`)
runs the very same code as the server. Hooks and per-phase handlers are resolved once per chain, not
per message; nothing here logs unless something went wrong.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar.errors import ProtocolError
from sidecar.headers import Headers
from sidecar.plugins import Context, Respond
from sidecar.registry import Chain

__all__ = ["StreamProcessor", "immediate_response"]

log = logging.getLogger("sidecar.extproc")

# Order of phases within each direction; a message may not go back to an earlier one.
_ORDER = {
    "request_headers": (0, 0), "request_body": (0, 1), "request_trailers": (0, 2),
    "response_headers": (1, 0), "response_body": (1, 1), "response_trailers": (1, 2),
}  # fmt: skip
_REPEATABLE = frozenset({"request_body", "response_body"})
_ERROR_BODY = b"Internal Server Error\n"


def _empty(kind: str) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    getattr(response, kind).SetInParent()
    return response


# Shared, never mutated: answering "continue, no change" costs no allocation.
_CONTINUE = {kind: _empty(kind) for kind in _ORDER}


def immediate_response(respond: Respond) -> pb.ProcessingResponse:
    body = respond.body.encode() if isinstance(respond.body, str) else respond.body
    response = pb.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = respond.status
    immediate.body = body
    if respond.details:
        immediate.details = respond.details
    if respond.grpc_status is not None:
        immediate.grpc_status.status = respond.grpc_status
    items = respond.headers.items() if hasattr(respond.headers, "items") else respond.headers
    for name, value in items:
        immediate.headers.set_headers.add(
            header=base_pb2.HeaderValue(key=name.lower(), raw_value=value.encode("latin-1")),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD,
        )
    return response


def _as_body(result: Any, plugin: str) -> bytes:
    if isinstance(result, bytes):
        return result
    if isinstance(result, bytearray | memoryview):
        return bytes(result)
    if isinstance(result, str):
        return result.encode()
    raise TypeError(f"body hook of {plugin!r} returned {type(result).__name__}; expected bytes, str, Respond or None")


class StreamProcessor:
    """Turns the ProcessingRequests of one stream into ProcessingResponses for one chain."""

    __slots__ = ("_last", "_metrics", "chain", "ctx", "mode_override")

    def __init__(self, chain: Chain, mode_override: Any = None, metrics: Any = None) -> None:
        self.chain = chain
        self.mode_override = mode_override
        self.ctx = Context(chain.name)
        self._metrics = metrics
        self._last: list[tuple[int, int] | None] = [None, None]

    async def process(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        """The answer to one message; None in observability mode. Raises ProtocolError on misuse."""
        kind = request.WhichOneof("request")
        if kind is None or kind not in _ORDER:
            raise ProtocolError(f"unexpected ProcessingRequest ({kind or 'empty'})")
        order = _ORDER[kind]
        direction = order[0]
        last = self._last[direction]
        if last is None:
            if kind != "request_headers" and self._last[0] is None:
                raise ProtocolError(f"{kind} arrived before request_headers")
        elif order < last or (order == last and kind not in _REPEATABLE):
            raise ProtocolError(f"{kind} arrived out of order")
        self._last[direction] = order
        if request.HasField("metadata_context"):
            self.ctx._metadata_pb = request.metadata_context
            self.ctx._metadata = None
        if request.attributes:
            self.ctx._attributes_pb = request.attributes
            self.ctx._attributes = None
        response = await _HANDLERS[kind](self, getattr(request, kind))
        if self.ctx.dynamic_metadata and response is not _CONTINUE[kind]:
            response.dynamic_metadata.update(self.ctx.dynamic_metadata)
            self.ctx.dynamic_metadata = {}
        elif self.ctx.dynamic_metadata:
            response = _empty(kind)
            response.dynamic_metadata.update(self.ctx.dynamic_metadata)
            self.ctx.dynamic_metadata = {}
        return None if request.observability_mode else response

    # -- failure policy ------------------------------------------------------------------------

    def _failed(self, kind: str, plugin: str, exc: BaseException) -> pb.ProcessingResponse:
        error_id = uuid.uuid4().hex[:16]
        log.error(
            "plugin %s failed in %s (chain %s, error id %s): %s: %s",
            plugin, kind, self.chain.name, error_id, type(exc).__name__, exc,
            exc_info=exc,
            extra={"error_id": error_id, "plugin": plugin, "phase": kind, "request_id": self.ctx.request_id},
        )  # fmt: skip
        if self._metrics is not None:
            self._metrics.plugin_error(plugin, kind)
        if self.chain.fail_open:
            return _CONTINUE[kind]
        return immediate_response(
            Respond(500, _ERROR_BODY, {"content-type": "text/plain", "x-sidecar-error-id": error_id},
                    details="sidecar_plugin_error")
        )  # fmt: skip

    # -- phases --------------------------------------------------------------------------------

    async def _headers(self, kind: str, message: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = Headers.from_envoy(message.headers)
        ctx = self.ctx
        if kind == "request_headers":
            ctx.request_headers = headers
            rid = headers.raw("x-request-id")
            ctx.request_id = rid.decode("latin-1") if rid else Context.new_request_id()
        else:
            ctx.response_headers = headers
        for hook in self.chain.hooks[kind]:
            try:
                result = await hook(ctx, headers)
            except Exception as exc:
                return self._failed(kind, hook.plugin, exc)
            if isinstance(result, Respond):
                return immediate_response(result)
        override = self.mode_override if kind == "request_headers" else None
        changed = headers.changed
        if not changed and override is None and not ctx.clear_route_cache_requested:
            return _CONTINUE[kind]
        response = pb.ProcessingResponse()
        common = getattr(response, kind).response
        if changed:
            headers.flush_into(common.header_mutation)
        if ctx.clear_route_cache_requested and kind == "request_headers":
            common.clear_route_cache = True
            ctx.clear_route_cache_requested = False
        if override is not None:
            response.mode_override.CopyFrom(override)
        return response

    async def _request_headers(self, message: pb.HttpHeaders) -> pb.ProcessingResponse:
        return await self._headers("request_headers", message)

    async def _response_headers(self, message: pb.HttpHeaders) -> pb.ProcessingResponse:
        return await self._headers("response_headers", message)

    async def _body(self, kind: str, message: pb.HttpBody) -> pb.ProcessingResponse:
        original = message.body
        body = original
        ctx = self.ctx
        for hook in self.chain.hooks[kind]:
            try:
                result = await hook(ctx, body)
                if result is None:
                    continue
                if isinstance(result, Respond):
                    return immediate_response(result)
                body = _as_body(result, hook.plugin)
            except Exception as exc:
                return self._failed(kind, hook.plugin, exc)
        headers = ctx.request_headers if kind == "request_body" else ctx.response_headers
        if body is not original and headers is not None and "content-length" in headers:
            # BUFFERED with headers sent: Envoy rejects a new body whose content-length is stale.
            headers["content-length"] = str(len(body))
        changed = headers is not None and headers.changed
        if body is original and not changed:
            return _CONTINUE[kind]
        response = pb.ProcessingResponse()
        common = getattr(response, kind).response
        if body is not original:
            if body:
                common.body_mutation.body = body
            else:
                common.body_mutation.clear_body = True
        if changed:
            headers.flush_into(common.header_mutation)  # type: ignore[union-attr]
        return response

    async def _request_body(self, message: pb.HttpBody) -> pb.ProcessingResponse:
        return await self._body("request_body", message)

    async def _response_body(self, message: pb.HttpBody) -> pb.ProcessingResponse:
        return await self._body("response_body", message)

    async def _trailers(self, kind: str, message: pb.HttpTrailers) -> pb.ProcessingResponse:
        trailers = Headers.from_envoy(message.trailers)
        for hook in self.chain.hooks[kind]:
            try:
                await hook(self.ctx, trailers)
            except Exception as exc:
                return self._failed(kind, hook.plugin, exc)
        if not trailers.changed:
            return _CONTINUE[kind]
        response = pb.ProcessingResponse()
        trailers.flush_into(getattr(response, kind).header_mutation)
        return response

    async def _request_trailers(self, message: pb.HttpTrailers) -> pb.ProcessingResponse:
        return await self._trailers("request_trailers", message)

    async def _response_trailers(self, message: pb.HttpTrailers) -> pb.ProcessingResponse:
        return await self._trailers("response_trailers", message)


_HANDLERS = {
    "request_headers": StreamProcessor._request_headers,
    "request_body": StreamProcessor._request_body,
    "request_trailers": StreamProcessor._request_trailers,
    "response_headers": StreamProcessor._response_headers,
    "response_body": StreamProcessor._response_body,
    "response_trailers": StreamProcessor._response_trailers,
}
