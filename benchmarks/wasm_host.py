"""Benchmark the proxy-wasm host: per-request cost of a header-only filter, cold vs cached module load.

    .venv/bin/python benchmarks/wasm_host.py [--requests N]

Fixture modules come from the test fixture build (npm SDKs, cached) and the Higress wheel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.wasm.host import Plugin  # noqa: E402
from sidecar.wasm.host.exchange import Request, Response, run_exchange  # noqa: E402
from tests.support.wasm_fixtures.build import build_all, higress_module  # noqa: E402

_REQUEST = [
    (":authority", "example.com"),
    (":path", "/"),
    (":method", "GET"),
    (":scheme", "http"),
    ("x-a", "1"),
]


def _per_request_us(run_one: Callable[[], None], requests: int) -> float:
    for _ in range(min(200, requests)):
        run_one()
    started = time.perf_counter()
    for _ in range(requests):
        run_one()
    return (time.perf_counter() - started) / requests * 1e6


def header_only(module: Path, root_id: str, requests: int) -> tuple[float, float]:
    """(µs per request driving callbacks directly, µs per request through run_exchange)."""
    plugin = Plugin(module, root_id=root_id, configuration="bench").start()

    def direct() -> None:
        http = plugin.http_context()
        http.on_request_headers(_REQUEST, end_of_stream=True)
        http.on_response_headers([(":status", "200")], end_of_stream=True)
        http.finish()

    request, response = Request(headers=[("x-a", "1")]), Response(200)

    def exchange() -> None:
        run_exchange(plugin, request, response)

    return _per_request_us(direct, requests), _per_request_us(exchange, requests)


def load_times(module: Path, rounds: int) -> tuple[float, float, float]:
    """(cold compile + instantiate s, cached load + instantiate s, cached load + start s), medians."""
    cold, warm, started = [], [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="wasm-bench-") as tmp:
            cache = Path(tmp)
            t0 = time.perf_counter()
            Plugin(module, cache=cache)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            Plugin(module, cache=cache)
            warm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            Plugin(module, cache=cache, configuration='{"provider": {"type": "openai"}}', seed=1).start()
            started.append(time.perf_counter() - t0)
    return statistics.median(cold), statistics.median(warm), statistics.median(started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modules = build_all()
    for name, root_id in (("gcore_readme", "add_header"), ("solo_readme", "add_header")):
        direct, exchange = header_only(modules[name], root_id, args.requests)
        print(
            f"{name:<14} header-only: {direct:7.1f} us/request direct ({1e6 / direct:6.0f} req/s), "
            f"{exchange:7.1f} us/request via run_exchange ({1e6 / exchange:6.0f} req/s)"
        )
    big = higress_module("gpustack-ai-proxy")
    size_mb = big.stat().st_size / 1e6
    cold, warm, started = load_times(big, args.rounds)
    print(
        f"gpustack-ai-proxy ({size_mb:.1f} MB): cold load {cold * 1000:.0f} ms, "
        f"cached load {warm * 1000:.1f} ms, cached load + start {started * 1000:.1f} ms ({cold / warm:.0f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
