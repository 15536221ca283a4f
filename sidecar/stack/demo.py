"""A small demo backend: answers with JSON describing the request it received, plus a few streams.

Used by `sidecar up` and the test harness as the upstream, so a curl through Envoy shows exactly what
the plugins did to the request (headers, body) and, in the response headers, what they did on the way
back. Request bodies are read in pieces and never held whole: the JSON carries the first MiB, the
length and the sha256.

    any path          the JSON echo (`x-echo-content-type` sets its content-type)
    /status/NNN       the echo, with that status
    /reflect          the request body sent back as it arrives (chunked)
    /bytes/N          N bytes of a repeating pattern, in 64 KiB chunks
    /lines/N          N JSON Lines (`application/x-ndjson`), one chunk each
    /sse/N            N server-sent events in the OpenAI chat-completion style, then `[DONE]`
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["EchoBackend", "pattern_bytes"]

_KEEP = 1024 * 1024
_PIECE = 64 * 1024
_PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
_MAX_GENERATED = 1 << 31


def pattern_bytes(n: int) -> Iterator[bytes]:
    """The first n bytes of the repeating pattern `/bytes/N` serves, in 64 KiB pieces."""
    block = _PATTERN * (_PIECE // len(_PATTERN) + 1)
    sent = 0
    while sent < n:
        piece = block[: min(_PIECE, n - sent)]
        sent += len(piece)
        yield piece


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sidecar-demo"
    # Headers and a small body leave in one write (the buffer is flushed once per response, or per
    # streamed chunk), and Nagle is off. Written separately, the body waited for the client's delayed
    # ACK of the headers: 40+ ms per keep-alive request.
    wbufsize = _PIECE + 4096
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        return None

    def _body_pieces(self) -> Iterator[bytes]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    break
                remaining = size
                while remaining:
                    piece = self.rfile.read(min(remaining, _PIECE))
                    if not piece:
                        return
                    remaining -= len(piece)
                    yield piece
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return
        remaining = int(self.headers.get("content-length") or 0)
        while remaining:
            piece = self.rfile.read(min(remaining, _PIECE))
            if not piece:
                return
            remaining -= len(piece)
            yield piece

    def _start(self, status: int, content_type: str, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        if length is None:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", str(length))
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, pieces: Iterator[bytes], content_type: str) -> None:
        self._start(200, content_type)
        for piece in pieces:
            if piece:
                self._chunk(piece)
        self.wfile.write(b"0\r\n\r\n")

    def _count(self, path: str) -> int:
        tail = path.rsplit("/", 1)[-1]
        return min(int(tail), _MAX_GENERATED) if tail.isdigit() else 0

    def _answer(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/reflect":
            self._stream(self._body_pieces(), self.headers.get("content-type", "application/octet-stream"))
            return
        if path.startswith("/bytes/"):
            self._drain()
            n = self._count(path)
            self._start(200, "application/octet-stream", n)
            for piece in pattern_bytes(n):
                self.wfile.write(piece)
            return
        if path.startswith("/lines/"):
            self._drain()
            lines = (json.dumps({"line": i}).encode() + b"\n" for i in range(self._count(path)))
            self._stream(lines, "application/x-ndjson")
            return
        if path.startswith("/sse/"):
            self._drain()
            self._stream(self._sse(self._count(path)), "text/event-stream")
            return
        self._echo(path)

    def _sse(self, n: int) -> Iterator[bytes]:
        for i in range(n):
            event = {"choices": [{"delta": {"content": f"word{i} "}}]}
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _drain(self) -> None:
        for _ in self._body_pieces():
            pass

    def _echo(self, path: str) -> None:
        digest = hashlib.sha256()
        kept = bytearray()
        length = 0
        for piece in self._body_pieces():
            digest.update(piece)
            length += len(piece)
            if len(kept) < _KEEP:
                kept += piece[: _KEEP - len(kept)]
        status = int(path[8:11]) if path.startswith("/status/") and path[8:11].isdigit() else 200
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": bytes(kept).decode("utf-8", "replace"),
                "body_length": length,
                "body_sha256": digest.hexdigest(),
            },
            indent=2,
        ).encode()
        self._start(status, self.headers.get("x-echo-content-type", "application/json"), len(payload))
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer


class EchoBackend:
    """The demo backend on 127.0.0.1 (port 0: chosen by the OS), in a background thread."""

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
