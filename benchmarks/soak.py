"""Soak: the stack under half load for a long while; memory, file descriptors and the log must stay flat.

The same stack as benchmarks/faults.py (Envoy with the `envoy-config` bootstrap in front of `sidecar serve
--workers 2`, a direct-response upstream). After a warm-up, it samples the sidecar's processes (the
supervisor and every worker): resident memory (sum of RSS) and open file descriptors, then runs the load
in 20 s slices and samples again at the end. Pass: RSS grew by less than 5 %, no file descriptor more
than at the start, no worker restarted, no failed request, no error line in the sidecar's log.

    python benchmarks/soak.py [--minutes 10] [--rate N]

A benchmark, not a test: minutes long, and its figures belong in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from faults import Stack, error_lines, load  # noqa: E402

from tests.support.load import children  # noqa: E402
from tests.support.proc import rss as process_rss  # noqa: E402

SLICE_SECONDS = 20.0
MAX_RSS_GROWTH = 0.05


@dataclass(frozen=True)
class Sample:
    pids: tuple[int, ...]
    rss: int  # bytes, summed over the processes
    fds: int  # open descriptors, summed


def sample(supervisor: int) -> Sample:
    pids = (supervisor, *children(supervisor))
    rss = fds = 0
    for pid in pids:
        rss += process_rss(pid)
        fds += len(os.listdir(f"/proc/{pid}/fd"))
    return Sample(pids, rss, fds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, help="requests/s (default: half the measured maximum)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory(prefix="sidecar-soak-") as tmp:
        stack = Stack(Path(tmp), args.workers, 0.5)
        try:
            address = stack.start()
            top = load(address, 4.0, None, None)
            rate = args.rate or round(top.rate / 2)
            print(f"maximum {top.rate:.0f} req/s; soaking at {rate:.0f} req/s for {args.minutes:g} min", flush=True)
            load(address, 15.0, rate, None)  # warm-up: connections, caches, allocator arenas
            start = sample(stack.sidecar.pid)
            deadline = time.monotonic() + args.minutes * 60
            total = failed = 0
            while time.monotonic() < deadline:
                report = load(address, min(SLICE_SECONDS, deadline - time.monotonic()), rate, None)
                total += len(report.outcomes)
                failed += len(report.failed)
                now = sample(stack.sidecar.pid)
                print(
                    f"  {total:>9} requests, {failed} failed; RSS {now.rss / 2**20:.1f} MiB, {now.fds} fds", flush=True
                )
            end = sample(stack.sidecar.pid)
            errors = error_lines(stack.sidecar.logs())
        finally:
            stack.close()
    growth = (end.rss - start.rss) / start.rss
    restarted = start.pids != end.pids
    print(f"requests: {total}, failed: {failed}")
    print(f"RSS: {start.rss / 2**20:.1f} MiB -> {end.rss / 2**20:.1f} MiB ({growth:+.2%}; limit +{MAX_RSS_GROWTH:.0%})")
    print(f"open fds: {start.fds} -> {end.fds}")
    print(f"workers restarted: {'yes' if restarted else 'no'}; error lines in the sidecar log: {len(errors)}")
    for line in errors[:5]:
        print("  " + line[:300])
    ok = growth < MAX_RSS_GROWTH and end.fds <= start.fds and not restarted and not failed and not errors
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
