"""Real HTTP/1.1 upstreams, for `run_exchange` and for a module's callouts, failing as Envoy's router does.

`HttpUpstream("127.0.0.1:8080")` is an `Upstream` for run_exchange: it sends the request as the filter
left it (a stale content-length included) and returns the response. `cluster_responder({"auth":
"127.0.0.1:9000"})` answers proxy_http_call callouts by cluster name. A cluster that refuses the
connection gets Envoy's own 503 ("upstream connect error ..."), one that does not answer within the
callout's timeout gets Envoy's 504 ("upstream request timeout"); a callout to a cluster that is not
listed fails the call (the module should have been refused by `Plugin(clusters=...)` first).

Every read is bounded: one overall deadline per request, at most `max_body_bytes` of body and
http.client's own limits on the status line and headers (64 KiB a line, 100 headers).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sidecar.wasm.host.errors import WasmUpstreamError
from sidecar.wasm.host.exchange import Response, UpstreamRequest
from sidecar.wasm.host.state import HeaderList, HttpCall, HttpCallResponse

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_ROUTE_TIMEOUT_S", "HttpUpstream", "cluster_responder"]

# Envoy's default route timeout.
DEFAULT_ROUTE_TIMEOUT_S = 15.0
# A bound on a response body kept in memory (callouts are buffered whole, as in Envoy).
DEFAULT_MAX_BODY_BYTES = 16 << 20
_READ = 64 << 10

#: The longest a real callout may take, whatever timeout the module asks for.
MAX_CALLOUT_TIMEOUT_MS = 60_000


def _shut(conn: http.client.HTTPConnection) -> None:
    """The deadline passed: end the exchange's socket, so a blocked read returns at once."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Failure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "connect", "timeout" or "too-large"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise WasmUpstreamError(f"upstream address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _exchange(
    address: str, headers: HeaderList, body: bytes, timeout_s: float, max_body: int
) -> tuple[int, HeaderList, bytes]:
    """One HTTP/1.1 request; raises _Failure. `headers` carry the pseudo-headers (:method, :path, ...)."""
    host, port = _split(address)
    deadline = time.monotonic() + timeout_s

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Failure("timeout", f"no complete answer from {address} within {timeout_s:g}s")
        return left

    conn = http.client.HTTPConnection(host, port, timeout=remaining())
    try:
        try:
            conn.connect()
        except TimeoutError:
            raise _Failure("timeout", f"connecting to {address} took longer than {timeout_s:g}s") from None
        except OSError as exc:
            raise _Failure("connect", f"cannot connect to {address}: {exc.strerror or exc}") from None
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        method, path = pseudo.get(":method", "GET"), pseudo.get(":path", "/")
        # The whole exchange is bounded by one deadline: a watchdog shuts the socket when it passes, so an
        # upstream dripping its status line or headers a byte at a time cannot outlive it.
        watchdog = threading.Timer(remaining(), _shut, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            # Method, path and headers come from the module: http.client refuses what is not HTTP
            # (ValueError), and Envoy would reset such a request.
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            length = None
            for k, v in headers:
                if k == ":authority":
                    conn.putheader("host", v)
                elif k == "content-length":
                    length = v  # as the filter left it, stale or not: Envoy forwards it
                elif not k.startswith(":"):
                    conn.putheader(k, v)
            if length is None and body:
                length = str(len(body))
            if length is not None:
                conn.putheader("content-length", length)
            conn.endheaders(body or None)
            assert conn.sock is not None
            conn.sock.settimeout(remaining())
            resp = conn.getresponse()
            chunks: list[bytes] = []
            size = 0
            while True:
                if conn.sock is not None:  # http.client drops the socket once the body is complete
                    conn.sock.settimeout(remaining())
                chunk = resp.read1(_READ)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_body:
                    raise _Failure("too-large", f"{address} answered with a body over {max_body} bytes")
                chunks.append(chunk)
            if time.monotonic() >= deadline:  # the watchdog cut the body short: not a complete answer
                raise TimeoutError
        except TimeoutError:
            raise _Failure("timeout", f"no complete answer from {address} within {timeout_s:g}s") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise _Failure("timeout", f"no complete answer from {address} within {timeout_s:g}s") from None
            raise _Failure("connect", f"{address} broke the exchange: {exc}") from None
        finally:
            watchdog.cancel()
        # Envoy's HTTP/1 codec consumes the framing header; `connection` and the rest reach the filter.
        got = [(k.lower(), v) for k, v in resp.getheaders() if k.lower() != "transfer-encoding"]
        return resp.status, got, b"".join(chunks)
    finally:
        conn.close()


@dataclass(frozen=True)
class HttpUpstream:
    """A real upstream at `address` (HOST:PORT) for run_exchange, failing as Envoy's router does."""

    address: str
    timeout_s: float = DEFAULT_ROUTE_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        _split(self.address)

    def __call__(self, request: UpstreamRequest) -> Response:
        headers = [*request.headers, ("x-envoy-expected-rq-timeout-ms", str(int(self.timeout_s * 1000)))]
        try:
            status, got, body = _exchange(self.address, headers, request.body, self.timeout_s, self.max_body_bytes)
        except _Failure as failure:
            if failure.kind == "too-large":
                raise WasmUpstreamError(f"{failure} (HttpUpstream.max_body_bytes)") from None
            reply = HttpCallResponse.timeout() if failure.kind == "timeout" else HttpCallResponse.connect_failure()
            return Response(int(reply.headers[0][1]), reply.headers[1:], reply.body)
        return Response(status, got, body)


def cluster_responder(
    clusters: Mapping[str, str], *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> Callable[[HttpCall], HttpCallResponse | None]:
    """A `Plugin.http_responder` that makes each callout for real, to the address of its cluster."""
    for address in clusters.values():
        _split(address)

    def respond(call: HttpCall) -> HttpCallResponse | None:
        address = clusters.get(call.upstream)
        if address is None:
            return None
        # The module picks the timeout (a u32 of milliseconds): capped, as the host blocks meanwhile.
        timeout_s = min(call.timeout_ms or 1, MAX_CALLOUT_TIMEOUT_MS) / 1000
        headers = [
            *call.headers,
            ("x-envoy-internal", "true"),
            ("x-envoy-expected-rq-timeout-ms", str(call.timeout_ms)),
        ]
        started = time.monotonic()
        try:
            status, got, body = _exchange(address, headers, call.body, timeout_s, max_body_bytes)
        except _Failure as failure:
            if failure.kind == "timeout":
                return HttpCallResponse.timeout()
            if failure.kind == "connect":
                return HttpCallResponse.connect_failure()
            return None  # Envoy fails a callout whose response outgrows its buffer
        elapsed = str(int((time.monotonic() - started) * 1000))
        return HttpCallResponse([(":status", str(status)), *got, ("x-envoy-upstream-service-time", elapsed)], body)

    return respond
