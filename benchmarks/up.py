"""`sidecar up` as a newcomer meets it: wrk through the real command vs the demo backend alone, one run.

Starts `sidecar up` (the bundled example: Envoy + the sidecar with header-stamp and json-redact + the
echo backend) exactly as `make run` does, reads the two URLs it prints, and alternates wrk rounds
between the echo backend reached directly (the baseline) and the same backend through Envoy and the
sidecar. The ratio says what the full stack costs relative to the backend on its own; the absolute
figure shows keep-alive requests are not stalled (the demo backend once wrote headers and body
separately and waited 40+ ms per request for a delayed ACK: 22 req/s at -c1).

    python benchmarks/up.py [--rounds 3] [--seconds 5] [--connections 1,4,16]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from extproc import wrk  # noqa: E402

from tests.support.net import free_port  # noqa: E402

_URL = re.compile(r"^(echo backend|envoy)\s+(http://\S+?)/?\s")
_START_SECONDS = 60.0


def _urls(process: subprocess.Popen[str]) -> dict[str, str]:
    """The echo backend's and Envoy's URLs from `sidecar up`'s start-up lines."""
    assert process.stderr is not None
    urls: dict[str, str] = {}
    deadline = time.monotonic() + _START_SECONDS
    while len(urls) < 2 and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise SystemExit(f"sidecar up exited before it was ready (exit {process.wait()})")
        match = _URL.match(line + " ")
        if match:
            urls[match.group(1)] = match.group(2) + "/hello"
    if len(urls) < 2:
        raise SystemExit("sidecar up printed no URLs in time")
    return urls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", default="1,4,16", help="comma-separated wrk -c values")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("benchmark needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    sidecar = Path(sys.executable).with_name("sidecar")
    process = subprocess.Popen(
        [str(sidecar), "up", "--port", str(free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    results: dict[tuple[str, int], list[float]] = {}
    try:
        urls = _urls(process)
        labels = {"echo backend": "backend alone", "envoy": "sidecar up"}
        for name in urls:
            wrk(urls[name], 1, max(connections))  # warm-up
        for round_no in range(1, args.rounds + 1):
            for c in connections:
                for name, url in urls.items():
                    rps, p50, p99, _ = wrk(url, args.seconds, c)
                    results.setdefault((name, c), []).append(rps)
                    print(
                        f"round {round_no} -c{c:<3} {labels[name]:<14} {rps:9.0f} req/s  p50 {p50:6.2f} ms  "
                        f"p99 {p99:6.2f} ms",
                        flush=True,
                    )
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    print()
    print(f"{'connections':>11} {'backend alone':>14} {'sidecar up':>11} {'ratio':>6}")
    for c in connections:
        alone = statistics.median(results[("echo backend", c)])
        up = statistics.median(results[("envoy", c)])
        print(f"{c:>11} {alone:14.0f} {up:11.0f} {up / alone:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
