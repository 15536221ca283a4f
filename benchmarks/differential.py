"""The differential suite at full size: generated plugin actions through the test Driver and through a real
Envoy + sidecar, compared after the normalisation of docs/testing.md ("Differential runs").

    python benchmarks/differential.py [--seed 14] [--count 2000] [--show 20]

Prints the counts (cases, agreements, disagreements) per kind of chain and the first disagreements; exits
1 when any case disagrees. The CI-sized run is tests/extproc/test_differential_envoy.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.testing import EnvoyHarness  # noqa: E402
from tests.support import differential as diff  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--show", type=int, default=20, help="disagreements to print")
    args = parser.parse_args()
    if args.count < 1:
        parser.error(f"--count: expected a number >= 1, got {args.count}")
    os.environ["PYTHONPATH"] = str(ROOT)  # the sidecar imports the scripted plugins from tests/support
    logging.getLogger("sidecar.extproc").setLevel(logging.CRITICAL)  # the Driver's plugin errors are scripted
    cases = diff.generate(args.seed, args.count)
    failed = False
    harnesses: list[EnvoyHarness] = []

    def start(**kwargs: object) -> EnvoyHarness:
        harness = EnvoyHarness(**kwargs)  # type: ignore[arg-type]
        harnesses.append(harness)
        return harness.start()

    for duplex in (False, True):
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="differential-") as workdir:
            try:
                tally = diff.run_cases(cases, duplex, Path(workdir), start)
            finally:
                while harnesses:
                    harnesses.pop().close()
        kind = "full-duplex" if duplex else "chains"
        seconds = time.monotonic() - started
        print(
            f"{kind}: {tally.cases} cases, {tally.agreed} agreed ({tally.races} by a documented race in Envoy), "
            f"{len(tally.disagreements)} disagreed ({seconds:.1f} s, seed {args.seed})"
        )
        for line in diff.report(tally).splitlines()[: args.show]:
            print("  " + line)
        failed = failed or bool(tally.disagreements)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
