"""Handing a cached module to Envoy: as a local file on a shared volume (`LocalHandoff`, Envoy's
`code.local`), or over HTTP (`HttpHandoff`, `code.remote`) from a `ModuleServer`, as EG's controller
serves them on :18002. `data_source(module, handoff)` is the Envoy `AsyncDataSource` dict for either.

The remote form mirrors EG's: `http_uri` with a 10 s timeout, the module's sha256, and a retry policy
of 10 retries with 1 s..30 s backoff.

ModuleServer paths are unguessable: base64url(HMAC-SHA256(secret, module sha256)). Only modules published to
this server are served; anything else is a 404, so the server does not list or leak the cache.
Envoy checks `remote.sha256` itself, so plain HTTP on loopback or the pod network is enough.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sidecar.wasm.fetch.cache import CachedModule, ModuleCache

__all__ = ["HttpHandoff", "LocalHandoff", "ModuleServer", "data_source"]


class ModuleServer:
    """A threaded HTTP server in the background; `publish(module)` returns the URL Envoy fetches."""

    def __init__(
        self,
        cache: ModuleCache,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: bytes | None = None,
        advertise_host: str | None = None,
    ) -> None:
        self._cache = cache
        self._secret = secret if secret is not None else os.urandom(32)
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        bound_port = int(self._httpd.server_address[1])
        self.base_url = f"http://{advertise_host or host}:{bound_port}"
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ModuleServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def path_for(self, sha256: str) -> str:
        mac = hmac.new(self._secret, sha256.encode(), hashlib.sha256).digest()
        return "/" + base64.urlsafe_b64encode(mac).rstrip(b"=").decode() + ".wasm"

    def publish(self, module: CachedModule) -> str:
        path = self.path_for(module.sha256)
        with self._lock:
            self._paths[path] = module.sha256
        return self.base_url + path

    def _lookup(self, path: str) -> str | None:
        with self._lock:
            return self._paths.get(path)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "sidecar-wasm"
            sys_version = ""

            def log_message(self, format: str, *args: Any) -> None:
                pass  # Envoy retries on its own; a log line per fetch is noise

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                sha = server._lookup(self.path.split("?", 1)[0])
                try:
                    if sha is None:
                        raise FileNotFoundError(self.path)
                    # Never through a symlink, only a regular file: Envoy checks remote.sha256 as well.
                    fd = os.open(server._cache.path_for(sha), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                    with os.fdopen(fd, "rb") as handle:
                        st = os.fstat(handle.fileno())
                        if not stat.S_ISREG(st.st_mode):
                            raise FileNotFoundError(self.path)
                        size = st.st_size
                        self.send_response(200)
                        self.send_header("Content-Type", "application/wasm")
                        self.send_header("Content-Length", str(size))
                        self.end_headers()
                        if body:
                            shutil.copyfileobj(handle, self.wfile, 256 << 10)
                except OSError:  # never published, evicted since, or not a plain file
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        return Handler


@dataclass(frozen=True)
class LocalHandoff:
    """Envoy reads the module from the shared volume. `envoy_cache_dir` is where Envoy's container
    mounts the cache root, if not at the same path as ours."""

    envoy_cache_dir: str | None = None


@dataclass(frozen=True)
class HttpHandoff:
    """Envoy fetches the module from `server` through its cluster `cluster`."""

    server: ModuleServer
    cluster: str
    timeout: str = "10s"
    num_retries: int = 10


def data_source(module: CachedModule, handoff: LocalHandoff | HttpHandoff) -> dict[str, Any]:
    """The Envoy `code` (AsyncDataSource) dict that hands `module` over as `handoff` says."""
    if isinstance(handoff, LocalHandoff):
        filename = str(module.path)
        if handoff.envoy_cache_dir is not None:
            filename = str(PurePosixPath(handoff.envoy_cache_dir) / "modules" / module.path.name)
        return {"local": {"filename": filename}}
    return {
        "remote": {
            "http_uri": {
                "uri": handoff.server.publish(module),
                "cluster": handoff.cluster,
                "timeout": handoff.timeout,
            },
            "sha256": module.sha256,
            "retry_policy": {
                "num_retries": handoff.num_retries,
                "retry_back_off": {"base_interval": "1s", "max_interval": "30s"},
            },
        }
    }
