"""A bounded HTTP/1.1 load generator for fault tests and benchmarks: every request's start, end and outcome.

Keep-alive connections on asyncio, paced to a target rate (or flat out), stopped by a request count or a
deadline, whichever comes first. Each request is recorded, so a test can ask which requests failed and
when they started relative to a fault. Loopback only: it refuses any other host.

Also what such a run needs around it: an upstream that is never the bottleneck (a direct-response
listener for the same Envoy) and the worker processes of a sidecar supervisor.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Outcome", "Report", "children", "direct_response_listener", "run_load"]

_MAX_HEAD = 16384
_MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Outcome:
    start: float  # time.monotonic() when the request was written
    end: float
    status: int  # 0: no HTTP response (connection error or timeout)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def rate(self) -> float:
        return len(self.outcomes) / max(self.ended - self.started, 1e-9)

    def in_flight(self, at: float) -> int:
        """Requests written before `at` and not answered by then."""
        return sum(1 for o in self.outcomes if o.start <= at < o.end)

    def failed_between(self, start: float, end: float = float("inf")) -> list[Outcome]:
        """Failed requests that started in [start, end)."""
        return [o for o in self.failed if start <= o.start < end]

    def summary(self) -> str:
        codes: dict[str, int] = {}
        for o in self.failed:
            key = str(o.status) if o.status else o.error
            codes[key] = codes.get(key, 0) + 1
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))
        return f"{len(self.outcomes)} requests, {len(self.failed)} failed" + (f" ({detail})" if detail else "")


class _Stop(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep-alive) of one response, its body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _MAX_HEAD:
        raise ValueError("response head too large")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if not 0 <= length <= _MAX_BODY:
        raise ValueError(f"response body of {length} bytes")
    if length:
        await reader.readexactly(length)
    return status, headers.get("connection", "").lower() != "close"


async def run_load(
    host: str,
    port: int,
    *,
    seconds: float,
    rate: float | None = None,
    connections: int = 8,
    max_requests: int = 1_000_000,
    path: str = "/",
    timeout: float = 5.0,
    on_tick: Callable[[float], None] | None = None,
) -> Report:
    """Send GET requests for `seconds` (at `rate` per second overall, or as fast as answers come).

    `on_tick(elapsed)` runs about every 10 ms on the load's own loop, so a caller can inject faults at
    known times without a second thread."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"load only goes to loopback, not {host}")
    report = Report()
    request = f"GET {path} HTTP/1.1\r\nHost: load\r\n\r\n".encode()
    report.started = begin = time.monotonic()
    deadline = begin + seconds
    tickets = iter(range(max_requests))

    async def next_slot() -> None:
        index = next(tickets, None)
        if index is None:
            raise _Stop
        if rate is not None:
            due = begin + index / rate
            if due > deadline:
                raise _Stop
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if time.monotonic() >= deadline:
            raise _Stop

    async def connection() -> None:
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        try:
            while True:
                await next_slot()
                start = time.monotonic()
                try:
                    if writer is None:
                        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                    assert reader is not None and writer is not None
                    writer.write(request)
                    status, keep = await asyncio.wait_for(_read_response(reader), timeout)
                    report.outcomes.append(Outcome(start, time.monotonic(), status))
                except (OSError, EOFError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
                    report.outcomes.append(Outcome(start, time.monotonic(), 0, type(exc).__name__))
                    keep = False
                if not keep and writer is not None:
                    writer.close()
                    writer = None
        except _Stop:
            pass
        finally:
            if writer is not None:
                writer.close()

    async def ticker() -> None:
        while True:
            if on_tick is not None:
                on_tick(time.monotonic() - begin)
            await asyncio.sleep(0.01)

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(connection() for _ in range(connections)))
    finally:
        tick.cancel()
    report.ended = time.monotonic()
    report.outcomes.sort(key=lambda o: o.start)
    return report


_HCM = "envoy.filters.network.http_connection_manager"
_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def direct_response_listener(name: str, port: int) -> dict[str, Any]:
    """An Envoy listener on 127.0.0.1:`port` answering every request 200 `ok` itself."""
    hcm = {
        "@type": _HCM_TYPE,
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": name,
        # OUTBOUND: `drain_listeners?inboundonly` drains the listener under test and leaves this upstream up.
        "traffic_direction": "OUTBOUND",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": _HCM, "typed_config": hcm}]}],
    }


def children(pid: int) -> list[int]:
    """The child processes of `pid` (a supervisor's workers), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(found)
