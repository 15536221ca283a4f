"""Loopback servers the translator's end-to-end tests start: named HTTP backends (TCP or Unix socket),
a one-answer DNS server, and a recording ext_proc server."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

_VOLATILE = {"x-request-id", "x-envoy-expected-rq-timeout-ms"}
_MAX_BODY = 1 << 20  # what a named backend reads of a request body


class _Named(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body_seen = b""  # a POST's body

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:  # also answers DELETE (below), so method matches can be told apart
        name = self.server.name  # type: ignore[attr-defined]
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/slow"):
            time.sleep(2)  # a request still in flight while the test reloads Envoy
        body = f"{name} {self.path}".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("x-backend", name)
        # What reached the backend: differential tests compare the X-Forwarded-For each config forwards.
        self.send_header("x-seen-xff", ", ".join(self.headers.get_all("x-forwarded-for") or []) or "-")
        # Differential tests compare the request headers each config forwards (less the per-request id)...
        seen = sorted((k.lower(), v) for k, v in self.headers.items() if k.lower() not in _VOLATILE)
        self.send_header("x-seen-headers", json.dumps(seen))
        self.send_header("x-seen-body-bytes", str(len(self.body_seen)))
        self.body_seen = b""  # the handler serves the connection's next request too
        # ...and what each config does to response headers the backend sends: `x-reply-header: name: value`.
        for line in self.headers.get_all("x-reply-header") or []:
            name, _, value = line.partition(":")
            self.send_header(name.strip(), value.strip())
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_DELETE = do_GET

    def do_POST(self) -> None:
        # Read the body (sized or chunked, at most 1 MiB) so the connection stays in step, and say how much came.
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while len(body) <= _MAX_BODY:
                size = int(self.rfile.readline(64).split(b";")[0], 16)
                body += self.rfile.read(size)
                self.rfile.readline(64)  # the CRLF after the chunk (or the empty trailer section)
                if size == 0:
                    break
        else:
            body = self.rfile.read(min(int(self.headers.get("content-length") or 0), _MAX_BODY + 1))
        if len(body) > _MAX_BODY:
            self.send_error(413)
            return
        self.body_seen = body
        self.do_GET()


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = self.socket.accept()
        return conn, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port) client address


class NamedBackend:
    """Answers every GET with `<name> <path>` and an `x-backend: <name>` header."""

    def __init__(self, name: str, unix_path: Path | None = None, address: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.name = name
        self.paths: list[str]
        self.unix_path = unix_path
        server: Any = _UnixHTTPServer(str(unix_path), _Named) if unix_path else ThreadingHTTPServer(address, _Named)
        server.daemon_threads = True
        server.name = name
        server.paths = self.paths = []
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)


class DnsServer:
    """UDP DNS on 127.0.0.1: A queries for names in `records` get that IPv4 address; anything else NOERROR, empty."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = {k.rstrip(".").lower(): v for k, v in records.items()}
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            self._sock.sendto(self._answer(data), peer)

    def _answer(self, query: bytes) -> bytes:
        (ident,) = struct.unpack("!H", query[:2])
        labels, pos = [], 12
        while query[pos]:
            length = query[pos]
            labels.append(query[pos + 1 : pos + 1 + length].decode())
            pos += 1 + length
        qtype = struct.unpack("!H", query[pos + 1 : pos + 3])[0]
        question = query[12 : pos + 5]
        name = ".".join(labels).lower()
        self.queries.append(name)
        address = self.records.get(name) if qtype == 1 else None
        answers = b""
        if address is not None:
            answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(address)
        header = struct.pack("!HHHHHH", ident, 0x8180, 1, 1 if answers else 0, 0, 0)
        return header + question + answers

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


class _Recorder(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, seen: list[tuple[str, Any]], context: list[tuple[list[str], list[str]]]) -> None:
        self.seen = seen
        self.context = context
        self.lock = threading.Lock()
        self.open_streams = 0  # streams Envoy has not closed yet: what they will see is not all seen

    def Process(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        with self.lock:
            self.open_streams += 1
        try:
            yield from self._answer(requests)
        finally:
            with self.lock:
                self.open_streams -= 1

    def _answer(self, requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            phase = request.WhichOneof("request")
            if phase == "request_headers":
                headers = request.request_headers.headers.headers
                self.seen.append((phase, {h.key: h.raw_value.decode() for h in headers}))
                # What the filter sends besides: the attributes asked for and the metadata namespaces forwarded.
                self.context.append((sorted(request.attributes), sorted(request.metadata_context.filter_metadata)))
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif phase == "response_headers":
                self.seen.append((phase, None))
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            elif phase == "response_body":
                self.seen.append((phase, (request.response_body.body, request.response_body.end_of_stream)))
                yield pb.ProcessingResponse(response_body=pb.BodyResponse())
            elif phase == "request_body":
                self.seen.append((phase, request.request_body.body))
                yield pb.ProcessingResponse(request_body=pb.BodyResponse())
            else:
                self.seen.append((phase, None))
                yield pb.ProcessingResponse(**{phase: pb.TrailersResponse()})


class ExtProcRecorder:
    """A gRPC ext_proc server that lets everything through and records what it saw.

    `where` is a Unix socket path, or `127.0.0.1:0` for TCP (the port is in `.port`).
    """

    def __init__(self, where: Path | str) -> None:
        self.path = Path(where) if isinstance(where, Path) else None
        self.seen: list[tuple[str, Any]] = []
        self.context: list[tuple[list[str], list[str]]] = []  # per request_headers: (attributes, namespaces)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._recorder = _Recorder(self.seen, self.context)
        pb_grpc.add_ExternalProcessorServicer_to_server(self._recorder, self._server)
        self.port = int(self._server.add_insecure_port(f"unix:{where}" if self.path else str(where)))
        self._server.start()
        if self.path is not None:
            os.chmod(self.path, 0o660)

    def idle(self) -> bool:
        """No stream open: everything Envoy sent so far has been recorded."""
        return self._recorder.open_streams == 0

    def phases(self) -> list[str]:
        return [phase for phase, _ in self.seen]

    def close(self) -> None:
        self._server.stop(grace=None).wait(5)
