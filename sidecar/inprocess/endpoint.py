"""The Prometheus endpoint of the plugins inside Envoy: the bridge's meters on the config file's `metrics` address.

`sidecar serve` serves its numbers on `metrics: HOST:PORT`; inside Envoy the same setting opens one port per Envoy
process, at the first filter config that names one, on the bridge's event-loop thread (no thread of its own; when
the watchdog replaces a loop a hook blocks, the endpoint serves from the new one too). It serves what the sidecar's
endpoint serves for one process: the per-plugin families (`sidecar_plugin_seconds`, `sidecar_plugin_errors`,
`sidecar_plugin_responses`), the stream counts, the plugins' own instruments and prometheus_client objects, and the
process (Envoy's) collectors; plus what only the in-process filter counts (header changes the mutation rules
dropped, phases the watchdog settled, loops replaced).

The endpoint is reachable by whoever reaches the address, as the sidecar's is: bind it to loopback or a pod
address. Each connection is one bounded request (its head at most MAX_REQUEST_HEAD bytes, read within
READ_TIMEOUT), answered and closed; at most MAX_CONNECTIONS are served at once, and more are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from sidecar.config import parse_host_port
from sidecar.errors import ConfigError
from sidecar.extproc.metrics import MetricsCollector
from sidecar.inprocess.loop import LoopThread
from sidecar.inprocess.meters import Meters

__all__ = ["MAX_CONNECTIONS", "MAX_REQUEST_HEAD", "READ_TIMEOUT", "RETRY_EVERY", "Endpoint"]

log = logging.getLogger("sidecar.inprocess")

#: A scrape's request line and headers; a longer head is answered 431 and closed.
MAX_REQUEST_HEAD = 8 * 1024
#: How long a client may take to send its request head.
READ_TIMEOUT = 5.0
#: Scrapes served at once; more connections are closed unanswered (a scraper retries at its next interval).
MAX_CONNECTIONS = 16
#: How often an address in use is tried again (a hot restart's parent Envoy holds it until it exits).
RETRY_EVERY = 1.0
#: How long `start` waits for the loop thread to bind the port.
_BIND_TIMEOUT = 10.0
_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _InProcessCollector(Collector):
    """What only the in-process filter counts."""

    def __init__(self, meters: Meters, runner: LoopThread) -> None:
        self._meters = meters
        self._runner = runner

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "sidecar_inprocess_rejected_header_mutations",
            "Header changes Envoy's default mutation rules dropped (ext_proc's rejected_header_mutations)",
            value=self._meters.rejected_mutations,
        )
        yield CounterMetricFamily(
            "sidecar_inprocess_watchdog_settled",
            "Async phases the watchdog settled: their hook blocked the event loop or ignored its cancellation",
            value=self._meters.backstops,
        )
        yield CounterMetricFamily(
            "sidecar_inprocess_loops_replaced",
            "Event loops replaced because a hook blocked them",
            value=self._runner.replaced,
        )


def _close_on(loop: asyncio.AbstractEventLoop, started: Future[asyncio.Server]) -> None:
    if not started.cancelled() and started.exception() is None:
        loop.call_soon_threadsafe(started.result().close)


class Endpoint:
    """One listening socket on the bridge's loop, serving GET /metrics (any path, as prometheus_client does)."""

    def __init__(
        self,
        address: str,
        meters: Meters,
        runner: LoopThread,
        *,
        registry: CollectorRegistry = REGISTRY,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.address = address
        self.read_timeout = read_timeout
        self.host, self.requested_port = parse_host_port(address, "metrics")
        self._runner = runner
        self._loop = runner.loop  # the loop the server was bound on
        self._registry = registry
        self._collectors: list[Collector] = [MetricsCollector(meters.snapshot), _InProcessCollector(meters, runner)]
        self._server: asyncio.Server | None = None
        #: Servers on replacement loops, on the same listening socket (see `_follow`).
        self._followers: list[tuple[asyncio.AbstractEventLoop, Future[asyncio.Server]]] = []
        self._open = 0
        self._closed = False
        self._retrying: Future[None] | None = None
        self.port = 0

    def start(self) -> int:
        """Serve; the bound port. An address another process holds (the parent Envoy of a hot restart, a running
        Envoy while `envoy-config --validate` checks a new config) does not reject the filter config: the endpoint
        says so in one log line and binds as soon as the address is free (port 0 until then). Any other address
        it cannot bind is a ConfigError in one line."""
        try:
            for collector in self._collectors:
                self._registry.register(collector)
        except ValueError as exc:  # another collector of this process already has these names
            self.close()
            raise ConfigError(f"metrics: {exc}") from None
        future = asyncio.run_coroutine_threadsafe(self._bind(), self._loop)
        try:
            server = future.result(_BIND_TIMEOUT)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                self.close()
                raise ConfigError(f"metrics: cannot listen on {self.address}: {exc.strerror or exc}") from None
            log.error(
                "in-process metrics: %s is in use (a hot restart's parent Envoy, or another process); "
                "binding it as soon as it is free, every %g s",
                self.address,
                RETRY_EVERY,
            )
            self._retrying = asyncio.run_coroutine_threadsafe(self._retry(), self._loop)
            return 0
        except TimeoutError:
            future.cancel()
            self.close()
            raise ConfigError(f"metrics: the in-process event loop did not bind {self.address} in time") from None
        self._bound(server)
        return self.port

    def _bound(self, server: asyncio.Server) -> None:
        self._server = server
        self.port = int(server.sockets[0].getsockname()[1])
        self._runner.on_replace.append(self._follow)
        log.info("in-process metrics on http://%s:%d/metrics", self.host, self.port)

    async def _retry(self) -> None:
        """Bind the address once it is free (a bounded cost: one attempt every RETRY_EVERY seconds)."""
        while not self._closed:
            await asyncio.sleep(RETRY_EVERY)
            try:
                server = await self._bind()
            except OSError:
                continue
            if self._closed:
                server.close()
            else:
                self._bound(server)
            return

    def _follow(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watchdog replaced the loop because a hook blocks it: serve from the new loop too, on a duplicate of
        the listening socket (the blocked loop cannot close its own; while it is blocked, only the new one
        accepts). Metrics are what show a blocked loop: they must not go dark with it."""
        server = self._server
        if server is None:
            return
        listening = socket.socket(fileno=os.dup(server.sockets[0].fileno()))
        start = asyncio.start_server(self._serve, sock=listening, limit=MAX_REQUEST_HEAD)
        self._followers.append((loop, asyncio.run_coroutine_threadsafe(start, loop)))

    async def _bind(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, self.host, self.requested_port, limit=MAX_REQUEST_HEAD)

    def close(self) -> None:
        """Stop listening and take the collectors out of the registry (tests; Envoy never unloads Python)."""
        self._closed = True
        if self._retrying is not None:
            self._retrying.cancel()
        for collector in self._collectors:
            with contextlib.suppress(KeyError):  # never registered (the bind failed)
                self._registry.unregister(collector)
        if self._follow in self._runner.on_replace:
            self._runner.on_replace.remove(self._follow)
        server = self._server
        if server is not None:
            self._server = None
            self._loop.call_soon_threadsafe(server.close)
        for loop, future in self._followers:
            future.add_done_callback(partial(_close_on, loop))
        self._followers = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            status, body = await self._answer(reader)
            head = (
                f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n"
                f"content-type: {(_CONTENT_TYPE if status.startswith('200') else b'text/plain').decode()}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (OSError, TimeoutError):
            pass  # the scraper went away or stalled: nothing to answer
        except Exception:  # never let a scrape take the loop's other work with it
            log.exception("in-process metrics: a scrape failed")
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        except asyncio.LimitOverrunError:
            return "431 Request Header Fields Too Large", b"request head too large\n"
        except asyncio.IncompleteReadError:
            return "400 Bad Request", b"incomplete request\n"
        method, _, rest = head.partition(b" ")
        if not rest:
            return "400 Bad Request", b"not an HTTP request\n"
        if method != b"GET":
            return "405 Method Not Allowed", b"GET /metrics\n"
        # On the loop thread, as everything here: a scrape takes a few milliseconds every scrape interval.
        return "200 OK", generate_latest(self._registry)
