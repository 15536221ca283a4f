"""Run one whole HTTP request/response through a filter the way Envoy's filter chain drives it.

Envoy's rules reproduced here:
* a headers callback that pauses stops the stream; body data arriving meanwhile is buffered and
  delivered in one callback once the module resumes it (proxy_continue_stream);
* a body callback that pauses keeps the data buffered; later chunks are appended and the next
  callback sees the cumulative size; at end of stream the stream waits for the module to resume;
* callouts are answered by the plugin's `http_responder` while the stream waits;
* a local reply ends the request path; the client gets the local reply instead of the upstream's,
  after it went through the filter's response callbacks (Envoy's encoder path);
* a body held back by the filter beyond the buffer limit (Envoy's per-connection default, 1 MiB)
  ends the exchange: 413 "Payload Too Large" for a request, a stream reset for a response.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from sidecar.wasm.host.abi import Action
from sidecar.wasm.host.plugin import HttpContext, Plugin
from sidecar.wasm.host.state import HeaderList, LocalResponse

__all__ = ["Exchange", "Request", "Response", "Upstream", "run_exchange"]

# Bound on resume attempts while a stream waits (each answers at least one callout).
_MAX_WAIT_ROUNDS = 1000
# Envoy's default per_connection_buffer_limit_bytes.
ENVOY_BUFFER_LIMIT = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str = "GET"
    path: str = "/"
    headers: HeaderList = field(default_factory=list)
    body: bytes = b""
    trailers: HeaderList = field(default_factory=list)
    authority: str = "example.com"
    scheme: str = "http"

    def envoy_headers(self) -> HeaderList:
        pseudo = [
            (":authority", self.authority),
            (":path", self.path),
            (":method", self.method),
            (":scheme", self.scheme),
        ]
        if self.body and not any(k.lower() == "content-length" for k, _ in self.headers):
            pseudo.append(("content-length", str(len(self.body))))
        return pseudo + [(k.lower(), v) for k, v in self.headers]


@dataclass(frozen=True)
class Response:
    status: int = 200
    headers: HeaderList = field(default_factory=list)
    body: bytes = b""
    trailers: HeaderList = field(default_factory=list)


@dataclass(frozen=True)
class UpstreamRequest:
    """What the upstream receives after the filter ran."""

    headers: HeaderList
    body: bytes
    trailers: HeaderList

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


Upstream = Callable[[UpstreamRequest], Response]
Phase = Literal[
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
]


_REQUEST_PHASES: tuple[Phase, Phase, Phase] = ("request_headers", "request_body", "request_trailers")
_RESPONSE_PHASES: tuple[Phase, Phase, Phase] = ("response_headers", "response_body", "response_trailers")


@dataclass
class Exchange:
    actions: list[tuple[Phase, Action]] = field(default_factory=list)
    upstream_request: UpstreamRequest | None = None
    response: Response | None = None
    local_response: LocalResponse | None = None
    stalled: Phase | None = None  # the module paused and nothing it waits for can resume it
    closed: bool = False  # the stream was reset (proxy_close_stream, or a response over the buffer limit)

    def header(self, name: str) -> str | None:
        if self.response is None:
            return None
        return next((v for k, v in self.response.headers if k == name), None)


def _chunks(body: bytes, size: int | None) -> Iterator[tuple[bytes, bool]]:
    if not size or len(body) <= size:
        yield body, True
        return
    for start in range(0, len(body), size):
        yield body[start : start + size], start + size >= len(body)


class _Run:
    def __init__(self, plugin: Plugin, http: HttpContext, result: Exchange, buffer_limit: int) -> None:
        self.plugin, self.http, self.result = plugin, http, result
        self.buffer_limit = buffer_limit
        self.overflow = False

    def record(self, phase: Phase, action: Action) -> Action:
        self.result.actions.append((phase, action))
        return action

    def ended(self) -> bool:
        return self.http.local_response is not None or self.http.closed

    def wait(self, phase: Phase, request: bool) -> bool:
        """After a pause: resolve callouts until the module resumes. False if it never does."""
        take = self.http.take_continue_request if request else self.http.take_continue_response
        for _ in range(_MAX_WAIT_ROUNDS):
            if take():
                return True
            if self.ended() or self.plugin.failed or self.plugin.dispatch_http_calls() == 0:
                break
        if not self.ended():
            self.result.stalled = phase
        return False

    def direction(
        self, request: bool, headers: HeaderList, body: bytes, trailers: HeaderList, chunk: int | None
    ) -> bool:
        """Headers, body, trailers of one direction; False if the stream stopped (local reply, stall)."""
        http = self.http
        on_headers, on_body, on_trailers, release = (
            (
                http.on_request_headers,
                http.on_request_body,
                http.on_request_trailers,
                http.release_request_body,
            )
            if request
            else (
                http.on_response_headers,
                http.on_response_body,
                http.on_response_trailers,
                http.release_response_body,
            )
        )
        headers_phase, body_phase, trailers_phase = _REQUEST_PHASES if request else _RESPONSE_PHASES
        action = self.record(headers_phase, on_headers(headers, not body and not trailers))
        headers_paused = action is not Action.CONTINUE
        if headers_paused and not self.wait(headers_phase, request):
            return False
        if self.ended():
            return False
        # Data that arrived while headers were stopped is buffered and handed over in one piece.
        for data, last in _chunks(body, None if headers_paused else chunk) if body else ():
            end = last and not trailers
            action = self.record(body_phase, on_body(data, end))
            if self.ended():
                return False
            held = http.request_body_held if request else http.response_body_held
            if action is not Action.CONTINUE and len(held) > self.buffer_limit:
                self.overflow = True
                return False
            if action is not Action.CONTINUE and end:
                if not self.wait(body_phase, request):
                    return False
                release()
        if trailers:
            action = self.record(trailers_phase, on_trailers(trailers))
            if action is not Action.CONTINUE and not self.wait(trailers_phase, request):
                return False
            release()
        return not self.ended()


# Envoy's own local reply when a request body held by a filter outgrows the buffer limit.
_PAYLOAD_TOO_LARGE = LocalResponse(413, [], b"Payload Too Large", "request_payload_too_large", None)


def _local_reply(local: LocalResponse) -> Response:
    headers = list(local.headers)
    if local.body:
        headers += [("content-length", str(len(local.body))), ("content-type", "text/plain")]
    return Response(local.status, headers, local.body)


def run_exchange(
    plugin: Plugin,
    request: Request,
    upstream: Upstream | Response,
    *,
    chunk_size: int | None = None,
    buffer_limit: int = ENVOY_BUFFER_LIMIT,
) -> Exchange:
    """One request through the filter, to `upstream` (a callable or a fixed Response), and back.

    `chunk_size` splits bodies into several body callbacks, as Envoy does for large or slow bodies.
    """
    result = Exchange()
    http = plugin.http_context()
    run = _Run(plugin, http, result, buffer_limit)
    try:
        if run.direction(True, request.envoy_headers(), request.body, request.trailers, chunk_size):
            sent = UpstreamRequest(http.request_headers, http.request_body, http.request_trailers)
            result.upstream_request = sent
            answer = upstream(sent) if callable(upstream) else upstream
        else:
            local = http.take_local_response()
            if run.overflow:
                local = _PAYLOAD_TOO_LARGE
                run.overflow = False
            if local is None:  # stalled, reset, or the VM failed: the client gets nothing
                result.closed = http.closed
                return result
            # Envoy sends a local reply through the encoder filters, this one included.
            result.local_response = local
            answer = _local_reply(local)
        headers = [(":status", str(answer.status)), *[(k.lower(), v) for k, v in answer.headers]]
        if run.direction(False, headers, answer.body, answer.trailers, chunk_size):
            status = next((v for k, v in http.response_headers if k == ":status"), str(answer.status))
            kept = [h for h in http.response_headers if h[0] != ":status"]
            result.response = Response(int(status), kept, http.response_body, http.response_trailers)
        else:
            local = http.take_local_response()
            if local is not None and result.local_response is None:
                result.local_response = local
                result.response = _local_reply(local)
        # Response headers have gone to the client already: Envoy can only reset the stream.
        result.closed = http.closed or run.overflow
    finally:
        if not plugin.failed:
            http.finish()
    return result
