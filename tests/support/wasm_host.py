"""Real components for the differential tests: an echo upstream on 127.0.0.1 and an Envoy running a module."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sidecar.stack.envoy import Envoy
from sidecar.wasm.host.exchange import Response

# Headers Envoy adds on its own (not the filter's doing) and that the host does not emulate.
ENVOY_ADDED = frozenset(
    {
        "x-request-id",
        "x-forwarded-proto",
        "x-envoy-expected-rq-timeout-ms",
        "date",
        "server",
        "x-envoy-upstream-service-time",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "x-envoy-decorator-operation",
        "x-envoy-internal",
    }
)


# What the client sees when Envoy resets the stream mid-response.
RESET = Response(0, [], b"")


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class EchoServer:
    """Answers and records every request. `x-echo-status` sets the status, `x-echo-h-NAME` a header."""

    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def handle(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        self.seen.append(Seen(method, path, headers, body))
        lookup = dict(headers)
        status = int(lookup.get("x-echo-status", "200"))
        out = [("x-echo", "yes")]
        out += [(k.removeprefix("x-echo-h-"), v) for k, v in headers if k.startswith("x-echo-h-")]
        if path.startswith("/callout"):
            return Response(200, [*out, ("x-callout-served", "1")], b"callout-body")
        return Response(status, out, body or f"echo {method} {path}".encode())


@contextmanager
def echo_server(*, close: bool = False) -> Iterator[EchoServer]:
    """`close`: answer `connection: close`, so Envoy opens a new upstream connection per request and bytes a
    module left over on one (a stale content-length) cannot leak into the next scenario."""
    echo = EchoServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = [(k.lower(), v) for k, v in self.headers.items()]
            resp = echo.handle(self.command, self.path, headers, body)
            self.send_response(resp.status)
            for k, v in resp.headers:
                self.send_header(k, v)
            self.send_header("content-length", str(len(resp.body)))
            if close:
                self.send_header("connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # Envoy resets some streams on purpose (buffer-limit scenarios)

    server = Server(("127.0.0.1", 0), Handler)
    echo.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield echo
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." + "HttpConnectionManager"


def bootstrap(module: Path, *, root_id: str, configuration: str, upstream_port: int) -> dict[str, Any]:
    wasm = {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "fixture",
                "root_id": root_id,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                "vm_config": {
                    "vm_id": "fixture-vm",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(module)}},
                },
            },
        },
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM_TYPE,
            "stat_prefix": "main",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}],
                    }
                ]
            },
            "http_filters": [
                wasm,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        },
    }
    cluster = {
        "name": "echo",
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "echo",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    listener = {
        "name": "main",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [hcm]}],
    }
    return {"static_resources": {"listeners": [listener], "clusters": [cluster]}}


def send(envoy: Envoy, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Response:
    host, port = envoy.listener_address("main")
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body or method in ("POST", "PUT"):
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        try:
            data = resp.read()
        except http.client.IncompleteRead:
            return RESET
        return Response(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], data)
    finally:
        conn.close()


def normalized(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers minus pseudo-headers and Envoy's own additions, sorted for comparison."""
    return sorted((k, v) for k, v in headers if not k.startswith(":") and k not in ENVOY_ADDED)


def describe(obj: object) -> str:
    return json.dumps(obj, default=lambda o: o.decode(errors="replace") if isinstance(o, bytes) else vars(o))


# -- the broader differential suite: a probe module in Envoy and in the host ------------------------------


# What a client saw: `complete` is False when the connection closed before the body ended (a reset after
# the headers went out); `stalled` when nothing came back before the client gave up.
@dataclass(frozen=True)
class ClientView:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = True
    stalled: bool = False


STALLED = ClientView(0, [], b"", complete=False, stalled=True)


def send_view(
    envoy: Envoy, method: str, path: str, headers: list[tuple[str, str]], body: bytes, *, timeout: float = 10
) -> ClientView:
    """One request through Envoy, keeping what a reset leaves (status, headers, the body up to the reset)."""
    host, port = envoy.listener_address("main")
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body or method in ("POST", "PUT"):
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        try:
            resp = conn.getresponse()
        except TimeoutError:
            return STALLED
        got = [(k.lower(), v) for k, v in resp.getheaders()]
        try:
            return ClientView(resp.status, got, resp.read())
        except http.client.IncompleteRead as cut:
            return ClientView(resp.status, got, cut.partial, complete=False)
        except TimeoutError:
            return ClientView(resp.status, got, b"", complete=False, stalled=True)
    finally:
        conn.close()


def probe_bootstrap(
    module: Path,
    *,
    upstream_port: int,
    clusters: dict[str, int],
    configuration: str = "probe-config",
    allow_on_headers_stop_iteration: bool = False,
) -> dict[str, Any]:
    """The probe module in front of the echo upstream, with a named route and extra callout clusters."""
    boot = bootstrap(module, root_id="probe", configuration=configuration, upstream_port=upstream_port)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    config = hcm["http_filters"][0]["typed_config"]["config"]
    config["name"] = "probe"
    config["vm_config"]["vm_id"] = "probe-vm"
    if allow_on_headers_stop_iteration:
        config["allow_on_headers_stop_iteration"] = True
    hcm["route_config"]["name"] = "probe-routes"
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    route["name"] = "probe-route"
    route["route"]["timeout"] = "3s"
    template = boot["static_resources"]["clusters"][0]
    for name, port in clusters.items():
        cluster = json.loads(json.dumps(template))
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = name
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = port
        boot["static_resources"]["clusters"].append(cluster)
    return boot


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (connections are refused)."""
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    yield port


@contextmanager
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (callouts to it time out)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()
