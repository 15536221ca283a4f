"""Run one whole HTTP request/response through a filter the way Envoy's filter chain drives it.

Envoy's rules reproduced here (checked against Envoy 1.40 by tests/wasm/host/test_differential.py):
* framing: over HTTP/1 (the default, `framing="http1"`) a body arrives as data callbacks with
  end_of_stream=false and then one empty callback with end_of_stream=true; `framing="whole"` delivers
  each body in one callback with end_of_stream=true (an HTTP/2 peer sending one DATA frame);
* Envoy's connection manager adds `x-forwarded-proto` and `x-request-id` before any filter runs, and its
  router adds `x-envoy-upstream-service-time` to the upstream's response;
* a headers callback that stops (StopAllIteration*, which Envoy makes of StopIteration) stops the stream;
  body data arriving meanwhile is buffered and delivered in one callback once the module resumes it
  (proxy_continue_stream). A true StopIteration (`allow_on_headers_stop_iteration`) still hands body data to
  the filter, and a body callback that continues resumes the stream;
* a body callback that pauses keeps the data buffered; later chunks are appended and the next callback
  sees the cumulative size; at end of stream the stream waits for the module to resume;
* callouts are answered by the plugin's `http_responder` while the stream waits;
* a local reply ends the request path; the client gets it through the filter's response callbacks
  (Envoy's encoder path). Once the response headers went to the client, a local reply can only cut the
  response short: the client keeps the status and headers it got and the body so far, then a reset;
* a body held back beyond the buffer limit (Envoy's per-connection default, 1 MiB) ends the exchange:
  413 "Payload Too Large" for a request, a reset for a response;
* a request stopped after its headers went on (a local reply from a body callback, the buffer limit) may
  already have reached the upstream: it is reported as an incomplete `upstream_request`;
* a body whose size no longer matches its `content-length` (a module that grew or cut it and left the
  header) is forwarded as Envoy forwards it: the header unchanged. An HTTP/1 peer reads what the header
  says, so the upstream or the client gets a truncated body and the leftover corrupts the next message on
  that connection; a body cut short leaves the upstream waiting until Envoy's route timeout (504). Each
  case is reported in `Exchange.warnings`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from sidecar.wasm.host.abi import Action
from sidecar.wasm.host.plugin import HttpContext, Plugin, continues
from sidecar.wasm.host.state import TIMEOUT_BODY, HeaderList, LocalResponse

__all__ = ["Exchange", "Framing", "Request", "Response", "Upstream", "run_exchange"]

# Bound on resume attempts while a stream waits (each answers at least one callout).
_MAX_WAIT_ROUNDS = 1000
# Envoy's default per_connection_buffer_limit_bytes.
ENVOY_BUFFER_LIMIT = 1 << 20
# Where the upstream is when the caller does not say (the upstream.address property).
DEFAULT_UPSTREAM_ADDRESS = "127.0.0.1:8080"

Framing = Literal["http1", "whole"]


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
        """The request headers as Envoy's filters see them: pseudo-headers first, the client's headers in
        order, then what the connection manager adds (`x-forwarded-proto`, a `x-request-id` UUID)."""
        pseudo = [
            (":authority", self.authority),
            (":path", self.path),
            (":method", self.method),
            (":scheme", self.scheme),
        ]
        own = [(k.lower(), v) for k, v in self.headers]
        names = {k for k, _ in own}
        if self.body and "content-length" not in names and "transfer-encoding" not in names:
            own.append(("content-length", str(len(self.body))))
        added = [("x-forwarded-proto", self.scheme)]
        if "x-request-id" not in names:
            added.append(("x-request-id", str(uuid.uuid4())))
        return pseudo + own + added


@dataclass(frozen=True)
class Response:
    status: int = 200
    headers: HeaderList = field(default_factory=list)
    body: bytes = b""
    trailers: HeaderList = field(default_factory=list)


@dataclass(frozen=True)
class UpstreamRequest:
    """What the upstream receives after the filter ran: the headers as the filter left them and every
    body byte Envoy sends (an HTTP/1 upstream reads only `content-length` of them)."""

    headers: HeaderList
    body: bytes
    trailers: HeaderList
    # False when Envoy had already sent the headers (and `body` so far) when the stream stopped (a local
    # reply from a body callback, the buffer limit): the upstream saw a request cut short, then a reset.
    complete: bool = True

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
    response: Response | None = None  # what the client got (cut short when `closed`)
    local_response: LocalResponse | None = None
    stalled: Phase | None = None  # the module paused and nothing it waits for can resume it
    closed: bool = False  # the stream was reset (proxy_close_stream, a late local reply, the buffer limit)
    warnings: list[str] = field(default_factory=list)  # what Envoy would do that the module likely did not mean

    def header(self, name: str) -> str | None:
        if self.response is None:
            return None
        return next((v for k, v in self.response.headers if k == name), None)


def _pieces(body: bytes, size: int | None, framing: Framing, end: bool) -> Iterator[tuple[bytes, bool]]:
    """The body callbacks' (data, end_of_stream) for a body; `end` when nothing (no trailers) follows."""
    chunks = [body[i : i + size] for i in range(0, len(body), size)] if size and len(body) > size else [body]
    if framing == "http1":
        yield from ((chunk, False) for chunk in chunks)
        if end:
            yield b"", True
        return
    for i, chunk in enumerate(chunks):
        yield chunk, end and i == len(chunks) - 1


def _content_length(headers: HeaderList) -> int | None:
    value = next((v for k, v in headers if k == "content-length"), None)
    return int(value) if value is not None and value.strip().isdigit() else None


class _Run:
    def __init__(self, plugin: Plugin, http: HttpContext, result: Exchange, buffer_limit: int, framing: Framing):
        self.plugin, self.http, self.result = plugin, http, result
        self.buffer_limit = buffer_limit
        self.framing: Framing = framing
        self.overflow = False
        self.response_headers_sent: HeaderList | None = None  # what the client got before a late failure
        self.request_headers_sent: HeaderList | None = None  # what the upstream got before a late stop

    def _headers_went_on(self, request: bool) -> None:
        """Envoy passed the headers on (to the upstream, or to the client) as they are now."""
        if request and self.request_headers_sent is None:
            self.request_headers_sent = self.http.request_headers
        if not request and self.response_headers_sent is None:
            self.response_headers_sent = self.http.response_headers

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
        # A true StopIteration (allow_on_headers_stop_iteration) still hands body data to this filter.
        data_flows = action is Action.PAUSE and bool(body)
        headers_paused = not continues(action, True)
        stopped = headers_paused and not data_flows
        if stopped and not self.wait(headers_phase, request):
            return False
        if self.ended():
            return False
        if not headers_paused or stopped:  # continued, or resumed by proxy_continue_stream
            self._headers_went_on(request)
        # Data that arrived while headers were stopped is buffered and handed over in one piece.
        whole = stopped
        pieces = _pieces(body, None if whole else chunk, "whole" if whole else self.framing, not trailers)
        for data, last in pieces if body else ():
            action = self.record(body_phase, on_body(data, last))
            if self.ended():
                return False
            if data_flows and action is Action.CONTINUE:
                data_flows = headers_paused = False  # the body callback continued the stopped headers
                self._headers_went_on(request)
            held = http.request_body_held if request else http.response_body_held
            if action is not Action.CONTINUE and len(held) > self.buffer_limit:
                self.overflow = True
                return False
            if action is not Action.CONTINUE and last:
                if not self.wait(body_phase, request):
                    return False
                release()
        if headers_paused and data_flows and not self.wait(headers_phase, request):
            return False
        self._headers_went_on(request)
        if trailers:
            action = self.record(trailers_phase, on_trailers(trailers))
            if action is not Action.CONTINUE and not self.wait(trailers_phase, request):
                return False
            release()
        return not self.ended()


# Envoy's own local reply when a request body held by a filter outgrows the buffer limit.
_PAYLOAD_TOO_LARGE = LocalResponse(413, [], b"Payload Too Large", "request_payload_too_large", None)
# Envoy's router reply when the upstream does not answer within the route timeout.
_UPSTREAM_TIMEOUT = Response(
    504, [("content-length", str(len(TIMEOUT_BODY))), ("content-type", "text/plain")], TIMEOUT_BODY
)


def _local_reply(local: LocalResponse) -> Response:
    """The response Envoy makes of a local reply: the module's headers, then the body's length and a
    text/plain type unless the module gave one."""
    headers = list(local.headers)
    if local.body:
        headers.append(("content-length", str(len(local.body))))
        if not any(k == "content-type" for k, _ in headers):
            headers.append(("content-type", "text/plain"))
    return Response(local.status, headers, local.body)


def _request_length_warning(sent: UpstreamRequest, result: Exchange) -> bool:
    """Warn about a forwarded body that disagrees with its content-length; True if the upstream would wait
    for bytes that never come."""
    length = _content_length(sent.headers)
    if length is None or length == len(sent.body):
        return False
    if len(sent.body) > length:
        result.warnings.append(
            f"the request body grew to {len(sent.body)} bytes but content-length still says {length}: Envoy "
            f"forwards the stale header, the upstream reads {length} bytes and the other "
            f"{len(sent.body) - length} corrupt the next request on that connection"
        )
        return False
    result.warnings.append(
        f"the request body shrank to {len(sent.body)} bytes but content-length still says {length}: the "
        "upstream waits for the rest and Envoy answers 504 when the route timeout passes"
    )
    return True


def _response_length_warning(response: Response, result: Exchange) -> Response:
    """What an HTTP/1 client reads of a response whose body disagrees with its content-length."""
    length = _content_length(response.headers)
    if length is None or length == len(response.body):
        return response
    if len(response.body) > length:
        result.warnings.append(
            f"the response body grew to {len(response.body)} bytes but content-length still says {length}: "
            f"the client reads {length} bytes and the rest corrupts the connection"
        )
        return Response(response.status, response.headers, response.body[:length], response.trailers)
    result.warnings.append(
        f"the response body shrank to {len(response.body)} bytes but content-length still says {length}: "
        "the client waits for the rest"
    )
    return response


def run_exchange(
    plugin: Plugin,
    request: Request,
    upstream: Upstream | Response,
    *,
    chunk_size: int | None = None,
    buffer_limit: int = ENVOY_BUFFER_LIMIT,
    framing: Framing = "http1",
    upstream_address: str = DEFAULT_UPSTREAM_ADDRESS,
) -> Exchange:
    """One request through the filter, to `upstream` (a callable or a fixed Response), and back.

    `framing` is how bodies reach the body callbacks (see the module docstring); `chunk_size` splits
    them further, as Envoy does for large or slow bodies. `upstream_address` is what the module reads
    as `upstream.address` once the upstream answered.
    """
    result = Exchange()
    http = plugin.http_context()
    run = _Run(plugin, http, result, buffer_limit, framing)
    try:
        if run.direction(True, request.envoy_headers(), request.body, request.trailers, chunk_size):
            sent = UpstreamRequest(http.request_headers, http.request_body, http.request_trailers)
            result.upstream_request = sent
            if _request_length_warning(sent, result) and not callable(upstream):
                # A real upstream (a callable, e.g. upstream.HttpUpstream) shows it by itself.
                answer = _UPSTREAM_TIMEOUT
                http.set_upstream(upstream_address, "upstream_response_timeout")
            else:
                started = time.monotonic()
                answer = upstream(sent) if callable(upstream) else upstream
                elapsed_ms = int((time.monotonic() - started) * 1000)
                http.set_upstream(upstream_address, "via_upstream")
                # Envoy's router adds this header to every upstream response.
                answer = Response(
                    answer.status,
                    [*answer.headers, ("x-envoy-upstream-service-time", str(elapsed_ms))],
                    answer.body,
                    answer.trailers,
                )
        else:
            if run.request_headers_sent is not None:
                cut = UpstreamRequest(run.request_headers_sent, http.request_body_sent, [], complete=False)
                result.upstream_request = cut
                result.warnings.append(
                    f"the request headers and {len(cut.body)} body bytes had already gone to the upstream when "
                    "the filter stopped the request: Envoy resets that upstream request, but the upstream saw it"
                )
            local = http.take_local_response()
            if run.overflow:
                local = _PAYLOAD_TOO_LARGE
                run.overflow = False
            if local is None:  # stalled, reset, or the VM failed: the client gets nothing
                result.closed = http.closed
                return result
            # Envoy sends a local reply through the encoder filters, this one included.
            result.local_response = local
            http.set_upstream(None, local.details)
            answer = _local_reply(local)
        headers = [(":status", str(answer.status)), *[(k.lower(), v) for k, v in answer.headers]]
        if run.direction(False, headers, answer.body, answer.trailers, chunk_size):
            status = next((v for k, v in http.response_headers if k == ":status"), str(answer.status))
            kept = [h for h in http.response_headers if h[0] != ":status"]
            response = Response(int(status), kept, http.response_body, http.response_trailers)
            result.response = _response_length_warning(response, result)
        else:
            local = http.take_local_response()
            if local is not None and result.local_response is None:
                result.local_response = local
                http.set_response(local.status, local.details, _local_reply(local).headers)
                sent_headers = run.response_headers_sent
                if sent_headers is None:
                    result.response = _local_reply(local)
                else:
                    # The headers already went out: the client keeps them and the body so far, then a reset.
                    status = next((v for k, v in sent_headers if k == ":status"), "0")
                    kept = [h for h in sent_headers if h[0] != ":status"]
                    result.response = Response(int(status), kept, http.response_body_sent)
                    result.closed = True
        # Response headers have gone to the client already: Envoy can only reset the stream.
        result.closed = result.closed or http.closed or run.overflow
    finally:
        if not plugin.failed:
            http.finish()
    return result
