"""A tiny echo backend: answers every request with JSON describing what it received.

Used by `sidecar up` and the test harness as the upstream, so a curl through Envoy shows exactly what
the plugins did to the request (headers, body) and, in the response headers, what they did on the way
back. `/status/NNN` answers with that status; a request header `x-echo-content-type` sets the response's
content-type.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["EchoBackend"]

_MAX_BODY = 64 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sidecar-demo"

    def log_message(self, format: str, *args: object) -> None:
        return None

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                total += size
                if size == 0 or total > _MAX_BODY:
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(min(length, _MAX_BODY))

    def _answer(self) -> None:
        body = self._read_body()
        status = 200
        if self.path.startswith("/status/") and self.path[8:11].isdigit():
            status = int(self.path[8:11])
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
                "body_length": len(body),
            },
            indent=2,
        ).encode()
        self.send_response(status)
        self.send_header("content-type", self.headers.get("x-echo-content-type", "application/json"))
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer


class EchoBackend:
    """The echo server on 127.0.0.1 (port 0: chosen by the OS), in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="echo-backend", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> EchoBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> EchoBackend:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
