"""Body throughput: Envoy alone vs Envoy + a STREAMED pass-through vs a FULL_DUPLEX_STREAMED pass-through.

Each variant is a real Envoy (1 worker) in front of the same demo backend; the sidecar variants add
`sidecar serve` (1 worker, Unix socket) with a plugin that passes every chunk on unchanged. Each round
downloads and uploads 10 MiB bodies through every variant in turn (interleaved, so machine noise hits all
alike) and the medians are printed as MB/s and as ratios to Envoy alone.

    python benchmarks/streaming.py [--rounds 3] [--transfers 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.stack.demo import EchoBackend, pattern_bytes  # noqa: E402
from sidecar.stack.envoy import Envoy  # noqa: E402
from sidecar.testing import EnvoyHarness  # noqa: E402
from sidecar.translate.bootstrap import LISTENER_NAME  # noqa: E402

SIZE = 10 * 1024 * 1024
PLUGINS = {"streamed": "tests.support.testplugins:StreamPass", "full-duplex": "tests.support.testplugins:FdPass"}


def transfer(client: httpx.Client, url: str, direction: str) -> float:
    started = time.perf_counter()
    if direction == "download":
        with client.stream("GET", url + f"/bytes/{SIZE}") as response:
            received = sum(len(piece) for piece in response.iter_bytes())
    else:
        received = client.post(url + "/upload", content=pattern_bytes(SIZE)).json()["body_length"]
    if received != SIZE:
        raise SystemExit(f"{url}: {direction} moved {received} bytes, expected {SIZE}")
    return SIZE / (time.perf_counter() - started) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transfers", type=int, default=5, help="10 MiB transfers per variant, direction, round")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(ROOT)
    with EchoBackend() as backend:
        harnesses = {name: EnvoyHarness(plugins=[plugin], upstream=backend.address) for name, plugin in PLUGINS.items()}
        try:
            urls = {}
            for name, harness in harnesses.items():
                urls[name] = harness.start().url
            plain = copy.deepcopy(harnesses["streamed"].bootstrap)
            hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
            with Envoy(plain) as alone:
                host, port = alone.listener_address(LISTENER_NAME)
                urls = {"envoy alone": f"http://{host}:{port}", **urls}
                results: dict[tuple[str, str], list[float]] = {}
                with httpx.Client(timeout=120) as client:
                    for url in urls.values():  # warm-up
                        transfer(client, url, "download")
                    for round_no in range(1, args.rounds + 1):
                        for direction in ("download", "upload"):
                            for name, url in urls.items():
                                rates = [transfer(client, url, direction) for _ in range(args.transfers)]
                                results.setdefault((name, direction), []).extend(rates)
                                rate = statistics.median(rates)
                                print(f"round {round_no} {direction:<8} {name:<12} {rate:7.1f} MB/s", flush=True)
        finally:
            for harness in harnesses.values():
                harness.close()
    print()
    for direction in ("download", "upload"):
        base = statistics.median(results[("envoy alone", direction)])
        for name in urls:
            rate = statistics.median(results[(name, direction)])
            print(f"{direction:<8} {name:<12} {rate:7.1f} MB/s  ratio {rate / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
