"""The ext_proc state machine of one stream: ProcessingRequests in, the matching ProcessingResponses out.

This is the hot path. It knows nothing about gRPC: one stream lifetime (`lifetime.serve`) runs it for
both transports and for the in-process test driver (`sidecar.testing`). Hooks are resolved once per
chain, not per message; nothing here logs unless something went wrong.

Outside FULL_DUPLEX_STREAMED every message gets exactly one answer: returned by `process`, or, when it
carries a body a hook handed back and the transport writes encoded pieces, written by `process` itself
without a message built around the body (`encoding`). In
FULL_DUPLEX_STREAMED bodies are answered with `streamed_response` chunks; when a chain has async-generator
stream hooks those chunks are produced by a task of the stream's lifetime (`duplex.DuplexPipe`) and
written through the stream's `send`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from sidecar.chains import BodyStage, Chain, Registry
from sidecar.config import DEFAULT_STREAM_TIMEOUT
from sidecar.errors import ProtocolError, StreamFailure
from sidecar.extproc.duplex import DuplexPipe, as_body, call_chunk
from sidecar.extproc.encoding import WriteEncoded, encode_new_body, encode_streamed, streamed_response
from sidecar.headers import Headers, append_option
from sidecar.logs import log_plugin_failure
from sidecar.plugins import BodyMode, Context, Respond

__all__ = ["ENVOY_BUFFER_LIMIT", "StreamProcessor", "immediate_response"]

log = logging.getLogger("sidecar.extproc")

# Order of phases within each direction; a message may not go back to an earlier one.
_ORDER = {
    "request_headers": (0, 0),
    "request_body": (0, 1),
    "request_trailers": (0, 2),
    "response_headers": (1, 0),
    "response_body": (1, 1),
    "response_trailers": (1, 2),
}
_REPEATABLE = frozenset({"request_body", "response_body"})
_ERROR_BODY = b"Internal Server Error\n"

#: Envoy's per-connection buffer limit in the configs the sidecar writes (Envoy's default). A BUFFERED body
#: longer than this cannot be buffered; BUFFERED_PARTIAL sends what it holds once past it.
ENVOY_BUFFER_LIMIT = 1024 * 1024

Send = Callable[[pb.ProcessingResponse], Awaitable[None]]


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
    options = immediate.headers.set_headers
    for name, value in respond.header_pairs:  # checked when the Respond was built
        options.append(append_option(name, value.encode("latin-1")))
    return response


class StreamProcessor:
    """Turns the ProcessingRequests of one stream into ProcessingResponses for one chain."""

    __slots__ = (
        "_body_modes",
        "_buffer_limit",
        "_disabled",
        "_filter_modes",
        "_last",
        "_observing",
        "_pipes",
        "_send",
        "_send_encoded",
        "_tasks",
        "chain",
        "ctx",
        "metrics",
        "mode_override",
        "stream_timeout",
    )

    def __init__(
        self,
        chain: Chain,
        registry: Registry | None = None,
        *,
        metrics: Any = None,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
        buffer_limit: int = ENVOY_BUFFER_LIMIT,
    ) -> None:
        plan = (registry or Registry([chain])).plan(chain)
        self.chain = chain
        self.mode_override = plan.mode_override
        self._body_modes = plan.body_modes
        self._filter_modes = plan.filter_body_modes
        self.ctx = Context(chain.name, namespaces=chain.writable_namespaces)
        self.metrics = metrics
        self.stream_timeout = stream_timeout
        #: Envoy's buffer limit: a body known to be longer gets no BUFFERED processing (`_buffer_too_small`).
        self._buffer_limit = buffer_limit
        self._send: Send | None = None
        self._send_encoded: WriteEncoded | None = None
        #: The message being answered came in observability mode: Envoy wants no answer to it.
        self._observing = False
        self._tasks: asyncio.TaskGroup | None = None
        self._last: list[tuple[int, int] | None] = [None, None]
        self._pipes: dict[str, DuplexPipe] = {}
        self._disabled: set[str] = set()  # fail_open: plugins bypassed for the rest of this stream

    @property
    def full_duplex(self) -> bool:
        """Whether a body of this stream is FULL_DUPLEX_STREAMED: answers may then be sent by other tasks."""
        return BodyMode.FULL_DUPLEX_STREAMED in self._body_modes

    def open(self, send: Send, tasks: asyncio.TaskGroup | None, send_encoded: WriteEncoded | None = None) -> None:
        """Run inside one stream's lifetime: messages other than answers (streamed body chunks,
        `ctx.extend_timeout`) go out through `send`; body pipelines run as tasks of `tasks`, which a
        FULL_DUPLEX stream must give. A transport that writes encoded pieces without joining them gives
        `send_encoded` too: streamed chunks, and bodies or chunks a hook replaced in any other mode, then go
        out without a message built around their bytes."""
        self._send = send
        self._send_encoded = send_encoded
        self._tasks = tasks
        self.ctx._send = send

    async def process(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        """The answer to one message, or None: observability mode, FULL_DUPLEX body chunks (a task sends
        them), or an answer already written encoded (`open`'s `send_encoded`).

        Raises ProtocolError when Envoy breaks the protocol, StreamFailure when a streaming body cannot go on.
        """
        kind = request.WhichOneof("request")
        if kind is None or kind not in _ORDER:
            raise ProtocolError(f"unexpected ProcessingRequest ({kind or 'empty'})")
        order = _ORDER[kind]
        direction = order[0]
        last = self._last[direction]
        if last is None:
            # The response side may come first: a filter before ext_proc (RBAC, JWT, CORS...) answered the
            # request itself, and Envoy still sends its local reply through ext_proc. The request side never
            # starts after that, nor with anything but its headers.
            if direction == 0 and (kind != "request_headers" or self._last[1] is not None):
                raise ProtocolError(f"{kind} arrived before request_headers")
        elif order < last or (order == last and kind not in _REPEATABLE):
            raise ProtocolError(f"{kind} arrived out of order")
        self._last[direction] = order
        if request.HasField("metadata_context"):
            self.ctx._metadata_pb = request.metadata_context
            self.ctx._metadata = None
        if request.attributes:
            # Envoy sends them with each direction's headers; a peer sending more keeps only the last two.
            self.ctx._attributes_pb = [*self.ctx._attributes_pb[-1:], request.attributes]
            self.ctx._attributes = None
        self._observing = request.observability_mode
        response = await _HANDLERS[kind](self, getattr(request, kind))
        if response is None or request.observability_mode:
            return None
        if self.ctx.dynamic_metadata:
            return self._with_metadata(_empty(kind) if response is _CONTINUE[kind] else response)
        return response

    def _with_metadata(self, response: pb.ProcessingResponse) -> pb.ProcessingResponse:
        """`response` with the dynamic metadata hooks set since the last answer, taken: it goes once."""
        response.dynamic_metadata.update(self.ctx.dynamic_metadata)
        self.ctx.dynamic_metadata = {}
        return response

    def close(self) -> None:
        """The stream is over (or failed): stop any body pipeline still running."""
        for pipe in self._pipes.values():
            pipe.cancel()

    # -- failure policy ------------------------------------------------------------------------

    def _log_failure(self, kind: str, plugin: str, exc: BaseException) -> str:
        error_id = log_plugin_failure(log, self.chain.name, kind, plugin, exc, self.ctx.request_id)
        if self.metrics is not None:
            self.metrics.plugin_error(plugin, kind, error_id)
        return error_id

    def _ran(self, kind: str, plugin: str, started: float, outcome: object) -> None:
        """One hook call is over (for per-plugin latency, responses and spans). Called inside the hook's
        `try`: a failure here must not count as the plugin's (a fail_open chain would then drop its deny)."""
        if self.metrics is not None:
            try:
                self.metrics.plugin_ran(plugin, kind, perf_counter() - started, outcome)
            except Exception:  # observability never decides a request
                log.exception("recording hook %s of plugin %s failed", kind, plugin)

    def _skip(self, kind: str, plugin: str, exc: BaseException) -> None:
        """fail_open: log and count the failure, and bypass the plugin for the rest of the stream (its
        state is unknown now); the chain's other plugins go on. The caller drops what the plugin changed."""
        self._log_failure(kind, plugin, exc)
        self._disabled.add(plugin)

    def _failed(self, kind: str, plugin: str, exc: BaseException) -> pb.ProcessingResponse:
        """fail_closed: the client gets a 500 with an error id that names the log line."""
        error_id = self._log_failure(kind, plugin, exc)
        return immediate_response(
            Respond(
                500,
                _ERROR_BODY,
                {"content-type": "text/plain", "x-sidecar-error-id": error_id},
                details="sidecar_plugin_error",
            )
        )

    # -- headers -------------------------------------------------------------------------------

    async def _headers(self, kind: str, message: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = Headers.from_envoy(message.headers)
        ctx = self.ctx
        if kind == "request_headers":
            ctx.request_headers = headers
            rid = headers.raw("x-request-id")
            ctx.request_id = rid.decode("latin-1") if rid else Context.new_request_id()
        else:
            ctx.response_headers = headers
            if not ctx.request_id:  # a local reply from a filter before ext_proc: no request headers came
                ctx.request_id = Context.new_request_id()
        fail_open = self.chain.fail_open
        for hook in self.chain.hooks[kind]:
            if fail_open:
                if hook.plugin in self._disabled:
                    continue
                before = headers.snapshot()
            started = perf_counter()
            try:
                # Sync hooks are called without a coroutine around them: this is the hottest loop.
                result = hook.func(ctx, headers)
                if hook.is_async:
                    result = await result
                if result is not None:
                    if isinstance(result, Respond):
                        self._ran(kind, hook.plugin, started, result)
                        return immediate_response(result)
                    # Anything else (403, "403", False, the Respond class...) is a broken plugin, never a pass.
                    raise hook.wrong(result)
                self._ran(kind, hook.plugin, started, None)
            except Exception as exc:
                self._ran(kind, hook.plugin, started, exc)
                if not fail_open:
                    return self._failed(kind, hook.plugin, exc)
                self._skip(kind, hook.plugin, exc)
                headers.restore(before)
        if kind == "request_headers" and self._buffer_too_small(headers):
            return _too_long_to_buffer("request_body")
        override = self.mode_override if kind == "request_headers" else None
        changed = headers.changed
        if not changed and override is None and not ctx.clear_route_cache_requested:
            return _CONTINUE[kind]
        response = pb.ProcessingResponse()
        answer = getattr(response, kind)
        answer.SetInParent()  # a mode_override alone must still answer this phase (reading sets nothing)
        common = answer.response
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

    # -- bodies --------------------------------------------------------------------------------

    async def _body(self, kind: str, message: pb.HttpBody) -> pb.ProcessingResponse | None:
        index = 0 if kind == "request_body" else 1
        mode = self._body_modes[index]
        if mode == BodyMode.NONE:
            if self._filter_modes[index] == BodyMode.NONE:
                raise ProtocolError(f"{kind} arrived but the processing mode says Envoy sends none")
            return _CONTINUE[kind]  # Envoy did not apply our mode_override; nothing to do for this chain
        stages = self.chain.body_stages[kind.split("_")[0]]
        if mode == BodyMode.FULL_DUPLEX_STREAMED:
            return await self._duplex(kind, message, stages)
        if mode == BodyMode.BUFFERED:
            return await self._buffered(kind, message, stages)
        return await self._chunked(kind, message, stages)

    async def _run_body_hooks(
        self, kind: str, stages: tuple[BodyStage, ...], body: bytes, end: bool
    ) -> bytes | pb.ProcessingResponse:
        """Body and chunk stages in order; the result, or the answer that ends the phase (Respond, failure)."""
        ctx = self.ctx
        for stage in stages:
            if stage.plugin in self._disabled:
                continue
            started = perf_counter()
            try:
                # Chunk hooks in a BUFFERED chain see the whole body as one final chunk.
                result = await (stage.hook(ctx, body) if stage.kind == "body" else stage.hook(ctx, body, end))
                if result is None:
                    self._ran(kind, stage.plugin, started, None)
                    continue
                if isinstance(result, Respond):
                    self._ran(kind, stage.plugin, started, result)
                    return immediate_response(result)
                body = as_body(result, stage.hook)
                self._ran(kind, stage.plugin, started, None)
            except Exception as exc:
                self._ran(kind, stage.plugin, started, exc)
                if not self.chain.fail_open:
                    return self._failed(kind, stage.plugin, exc)
                self._skip(kind, stage.plugin, exc)
        return body

    async def _buffered(
        self, kind: str, message: pb.HttpBody, stages: tuple[BodyStage, ...]
    ) -> pb.ProcessingResponse | None:
        original = message.body
        body = await self._run_body_hooks(kind, stages, original, True)
        if isinstance(body, pb.ProcessingResponse):
            return body
        ctx = self.ctx
        headers = ctx.request_headers if kind == "request_body" else ctx.response_headers
        if body is not original and headers is not None and "content-length" in headers:
            # BUFFERED with headers sent: Envoy rejects a new body whose content-length is stale.
            headers._put("content-length", str(len(body)).encode())
        changed = headers is not None and headers.changed
        if body is original and not changed:
            return _CONTINUE[kind]
        response = pb.ProcessingResponse()
        common = getattr(response, kind).response
        if changed:
            headers.flush_into(common.header_mutation)  # type: ignore[union-attr]
        if body is original:
            return response
        if not body:
            common.body_mutation.clear_body = True
            return response
        return await self._new_body(kind, body, response)

    async def _chunked(
        self, kind: str, message: pb.HttpBody, stages: tuple[BodyStage, ...]
    ) -> pb.ProcessingResponse | None:
        """STREAMED and BUFFERED_PARTIAL: one answer per chunk, of any size (empty holds data back)."""
        original = message.body
        end_lost = not message.end_of_stream and self._whole_partial_body(kind, len(original))
        out = await self._run_body_hooks(kind, stages, original, message.end_of_stream or end_lost)
        if isinstance(out, pb.ProcessingResponse):
            return out
        if end_lost:
            return _too_long_to_buffer(kind)
        if out is original:
            return _CONTINUE[kind]
        if out:
            return await self._new_body(kind, out)
        response = pb.ProcessingResponse()
        getattr(response, kind).response.body_mutation.clear_body = True
        return response

    async def _new_body(
        self, kind: str, body: bytes, response: pb.ProcessingResponse | None = None
    ) -> pb.ProcessingResponse | None:
        """The answer that replaces the body (or chunk) with `body`, not empty, along with what `response`
        holds already; None when it went out encoded (`open`'s `send_encoded`).

        Encoded, a transforming plugin's body is not copied into a message (55 us per MiB), as in
        FULL_DUPLEX: the rest of the answer is serialised without it, and `encode_new_body` follows. Two
        encoded messages end to end parse as their merge (protobuf's rule), so Envoy reads one answer."""
        send_encoded = self._send_encoded
        if send_encoded is None or self._observing:
            response = response if response is not None else pb.ProcessingResponse()
            getattr(response, kind).response.body_mutation.body = body
            return response
        if self.ctx.dynamic_metadata:  # what `process` adds to an answer it returns
            response = self._with_metadata(response if response is not None else pb.ProcessingResponse())
        rest = response.SerializeToString() if response is not None else b""
        head, same = encode_new_body(kind, body)
        await send_encoded(rest + head, same)
        return None

    def _buffer_too_small(self, headers: Headers) -> bool:
        """A BUFFERED request body that its content-length says is longer than Envoy's buffer.

        Envoy 1.40 answers such a request 413 only when the body arrives after our headers answer. When it
        arrives first under another filter-level body mode (a mode_override narrows it for this chain), Envoy
        holds a buffer's worth, stops reading, and never sends the body nor a reply: the client hangs (on
        HTTP/1; docs/streaming.md has the figures). The sidecar answers 413 itself then. When the filter buffers
        too, Envoy's own limit (which a deployment may have raised past ours) decides, as it should."""
        if self._body_modes[0] != BodyMode.BUFFERED or self._filter_modes[0] == BodyMode.BUFFERED:
            return False
        length = _content_length(headers)
        return length is not None and length > self._buffer_limit

    def _whole_partial_body(self, kind: str, size: int) -> bool:
        """A BUFFERED_PARTIAL chunk that holds the whole body (its content-length) without end_of_stream.

        Envoy 1.40 sends the body it holds once past its buffer limit; when the end of the body (an empty
        last chunk) comes in while our answer is awaited, Envoy drops it: the peer never gets the end of the
        body, and no timer runs. A chunk like this one is that case. Its hooks see it as the whole body it
        is; unless one of them answers, the sidecar does (413 for a request, 500 for a response): a reply now,
        not a hang. A smaller body Envoy still holds whole: without its end, trailers follow (HTTP/2, gRPC),
        and it goes on as any partial chunk."""
        index = 0 if kind == "request_body" else 1
        if self._body_modes[index] != BodyMode.BUFFERED_PARTIAL:
            return False
        headers = self.ctx.request_headers if index == 0 else self.ctx.response_headers
        length = _content_length(headers) if headers is not None else None
        return length is not None and 0 < length <= size and size >= self._buffer_limit

    async def _duplex(
        self, kind: str, message: pb.HttpBody, stages: tuple[BodyStage, ...]
    ) -> pb.ProcessingResponse | None:
        if any(stage.kind == "stream" for stage in stages):
            pipe = self._pipes.get(kind)
            if pipe is None:
                if self._send is None or self._tasks is None:
                    raise RuntimeError("FULL_DUPLEX stream hooks run inside a stream's lifetime (lifetime.serve)")
                pipe = self._pipes[kind] = DuplexPipe(
                    kind, stages, self.ctx, self._send_streamed, self.stream_timeout, self._tasks, self._stream_fault
                )
            await pipe.feed(message.body, message.end_of_stream)
            return None
        # Chunk hooks only (or none): answer each chunk inline, in order, one streamed chunk per input chunk.
        end = message.end_of_stream
        body = await self._duplex_chunk_hooks(kind, stages, message.body, end) if stages else message.body
        if not self._observing:
            await self._send_streamed(kind, body, end)
        return None

    async def _send_streamed(self, kind: str, body: bytes, end_of_stream: bool, *more: bytes) -> None:
        """One streamed chunk to Envoy (`body` and `more` end to end), with the dynamic metadata a hook set
        since the last message."""
        send_encoded = self._send_encoded
        if send_encoded is not None:
            # The hot path: no message built around the body, which is not copied (the transport writes
            # views of it). Metadata a hook set goes with its output, encoded before it (see `_new_body`).
            head, *pieces = encode_streamed(kind, body, end_of_stream, *more)
            if self.ctx.dynamic_metadata:
                head = self._with_metadata(pb.ProcessingResponse()).SerializeToString() + head
            await send_encoded(head, *pieces)
            return
        if self._send is None:
            raise RuntimeError("FULL_DUPLEX bodies are answered inside a stream's lifetime (lifetime.serve)")
        response = streamed_response(kind, b"".join((body, *more)) if more else body, end_of_stream)
        await self._send(self._with_metadata(response) if self.ctx.dynamic_metadata else response)

    async def _duplex_chunk_hooks(self, kind: str, stages: tuple[BodyStage, ...], body: bytes, end: bool) -> bytes:
        """Chunk hooks in FULL_DUPLEX, each bounded by the stream deadline (Envoy applies none here)."""
        for stage in stages:
            deadline = asyncio.timeout(self.stream_timeout)  # not wait_for: see DuplexPipe.feed
            try:
                async with deadline:
                    body = await call_chunk(stage, self.ctx, body, end)
            except TimeoutError as exc:
                if not deadline.expired():  # the plugin's own TimeoutError, not our deadline
                    raise self._stream_fault(kind, stage, exc) from None
                raise StreamFailure(
                    f"{kind}: {stage.hook.name} of plugin {stage.plugin!r} took longer than {self.stream_timeout:g}s"
                ) from None
            except Exception as exc:
                raise self._stream_fault(kind, stage, exc) from None
        return body

    def _stream_fault(self, kind: str, stage: BodyStage, exc: BaseException) -> StreamFailure:
        """A plugin failed inside a streamed body: logged and counted like any plugin error, then the stream
        fails (its output may be under way: nothing else is safe). The exception's text stays in the log."""
        error_id = self._log_failure(kind, stage.plugin, exc)
        return StreamFailure(f"{kind}: plugin {stage.plugin!r} failed in {stage.hook.name} (error id {error_id})")

    async def _request_body(self, message: pb.HttpBody) -> pb.ProcessingResponse | None:
        return await self._body("request_body", message)

    async def _response_body(self, message: pb.HttpBody) -> pb.ProcessingResponse | None:
        return await self._body("response_body", message)

    # -- trailers ------------------------------------------------------------------------------

    async def _trailers(self, kind: str, message: pb.HttpTrailers) -> pb.ProcessingResponse:
        direction = kind.split("_")[0]
        index = 0 if direction == "request" else 1
        if self._body_modes[index] == BodyMode.FULL_DUPLEX_STREAMED:
            await self._end_duplex_body(f"{direction}_body")
        trailers = Headers.from_envoy(message.trailers)
        fail_open = self.chain.fail_open
        for hook in self.chain.hooks[kind]:
            if fail_open:
                if hook.plugin in self._disabled:
                    continue
                before = trailers.snapshot()
            started = perf_counter()
            try:
                result = await hook(self.ctx, trailers)
                if result is not None:  # a Respond too: trailers come after the body went on
                    raise hook.wrong(result)
                self._ran(kind, hook.plugin, started, None)
            except Exception as exc:
                self._ran(kind, hook.plugin, started, exc)
                if not fail_open:
                    return self._failed(kind, hook.plugin, exc)
                self._skip(kind, hook.plugin, exc)
                trailers.restore(before)
        if not trailers.changed:
            return _CONTINUE[kind]
        response = pb.ProcessingResponse()
        trailers.flush_into(getattr(response, kind).header_mutation)
        return response

    async def _end_duplex_body(self, body_kind: str) -> None:
        """Trailers end a FULL_DUPLEX body: every stage flushes before the trailers are answered."""
        pipe = self._pipes.get(body_kind)
        if pipe is not None:
            await pipe.end_with_trailers()
            return
        stages = self.chain.body_stages[body_kind.split("_")[0]]
        flushed = await self._duplex_chunk_hooks(body_kind, stages, b"", True) if stages else b""
        if flushed:
            await self._send_streamed(body_kind, flushed, False)

    async def _request_trailers(self, message: pb.HttpTrailers) -> pb.ProcessingResponse:
        return await self._trailers("request_trailers", message)

    async def _response_trailers(self, message: pb.HttpTrailers) -> pb.ProcessingResponse:
        return await self._trailers("response_trailers", message)


def _content_length(headers: Headers) -> int | None:
    """The content-length a message announces, or None (absent, or not a plain number: Envoy refuses those)."""
    value = headers.raw("content-length")
    if value is None or not value.isdigit() or len(value) > 19:
        return None
    return int(value)


def _too_long_to_buffer(kind: str) -> pb.ProcessingResponse:
    """What the sidecar answers for a body Envoy cannot buffer or would lose the end of (a new message: the
    caller may add metadata to it)."""
    status, body = (413, b"Payload Too Large\n") if kind == "request_body" else (500, _ERROR_BODY)
    return immediate_response(
        Respond(status, body, {"content-type": "text/plain"}, details="sidecar_body_over_buffer_limit")
    )


_HANDLERS = {
    "request_headers": StreamProcessor._request_headers,
    "request_body": StreamProcessor._request_body,
    "request_trailers": StreamProcessor._request_trailers,
    "response_headers": StreamProcessor._response_headers,
    "response_body": StreamProcessor._response_body,
    "response_trailers": StreamProcessor._response_trailers,
}
