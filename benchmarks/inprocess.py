"""The in-process backend against Envoy alone and the ext_proc sidecar: wrk, interleaved, in one run.

One Envoy carries four listeners: `plain` (router only), `inprocess` (the dynamic-module filter running the
chain inside Envoy -> router), `main` (ext_proc -> `sidecar serve` on its native transport -> router) and
`backend` (a direct response the others route to), so every path shares the upstream and the process. The
plugin is the same everywhere: one request header and one response header (tests.support.testplugins:AddHeaders).
The whole run is done with 1 Envoy worker thread, then with 2 (one Python serves both: its GIL is shared).

    python benchmarks/inprocess.py [--rounds 3] [--seconds 5] [--connections 16] [--workers 1,2]

Prints, per worker count: req/s per round, the ratio to Envoy alone (median of rounds), Envoy's CPU per
request (/proc/PID/stat utime+stime: the in-process chain's Python is Envoy's CPU) and what each path adds to
Envoy alone, and the sidecar's own CPU per request. Targets (1 worker): in-process >= 0.8 of Envoy alone and
<= 15 us of added Envoy CPU per request.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from extproc import PLUGIN, bootstrap, wrk  # noqa: E402

from sidecar.config import SidecarConfig  # noqa: E402
from sidecar.inprocess.module import envoy_environment  # noqa: E402
from sidecar.stack.envoy import Envoy  # noqa: E402
from sidecar.stack.inprocess import hook_deadline_ms, use_inprocess_filter  # noqa: E402
from sidecar.stack.sidecar import SidecarProcess  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.proc import cpu_seconds  # noqa: E402

PATHS = {"plain": "Envoy alone", "inprocess": "in-process", "main": "sidecar (ext_proc)"}


def _with_inprocess(result: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """`result` plus an `inprocess` listener: a copy of `main` whose ext_proc filter runs in Envoy instead."""
    listener = copy.deepcopy(result["static_resources"]["listeners"][0])
    listener["name"] = "inprocess"
    alone = {"static_resources": {"listeners": [listener], "clusters": []}}
    use_inprocess_filter(alone, config_path, deadline_ms=hook_deadline_ms(SidecarConfig(message_timeout=2.0)))
    result["static_resources"]["listeners"].append(listener)
    return result


def run(workers: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    socket = tmp / f"sidecar-{workers}.sock"
    config = tmp / "inprocess.yaml"
    config.write_text(f'chains:\n  default:\n    plugins: ["{PLUGIN}"]\n')
    sidecar = SidecarProcess(["--plugin", PLUGIN, "--listen", f"unix:{socket}"], [socket], log_path=tmp / "sidecar.log")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in PATHS}  # (req/s, Envoy us/req)
    sidecar_cpu: list[float] = []
    with (
        sidecar,
        Envoy(
            _with_inprocess(bootstrap(socket, free_port(), {}), config.resolve()),
            concurrency=workers,
            env=envoy_environment(),
            workdir=tmp / f"envoy-{workers}",
        ) as envoy,
    ):
        urls = {}
        for name in PATHS:
            host, port = envoy.listener_address(name)
            urls[name] = f"http://{host}:{port}/"
        for name in PATHS:  # warm-up: connections, caches, allocators, the interpreter's first imports
            wrk(urls[name], 1, args.connections)
        for round_no in range(1, args.rounds + 1):
            for name in PATHS:
                envoy_before, sidecar_before = cpu_seconds(envoy.pid), cpu_seconds(sidecar.pid)
                rps, _p50, _p99, total = wrk(urls[name], args.seconds, args.connections)
                envoy_us = (cpu_seconds(envoy.pid) - envoy_before) / total * 1e6
                results[name].append((rps, envoy_us))
                line = f"{workers}w round {round_no} {name:<9} {rps:9.0f} req/s  Envoy CPU {envoy_us:5.1f} us/req"
                if name == "main":
                    sidecar_cpu.append((cpu_seconds(sidecar.pid) - sidecar_before) / total * 1e6)
                    line += f"  sidecar CPU {sidecar_cpu[-1]:5.1f} us/req"
                print(line, flush=True)
    return {"results": results, "sidecar_cpu": sidecar_cpu}


def summary(workers: int, measured: dict[str, Any]) -> list[str]:
    results: dict[str, list[tuple[float, float]]] = measured["results"]

    def median(name: str, index: int) -> float:
        return statistics.median(r[index] for r in results[name])

    plain_rps, plain_cpu = median("plain", 0), median("plain", 1)
    lines = [
        f"{workers} Envoy worker{'s' if workers > 1 else ''}:",
        f"  {'':<20} {'req/s':>9} {'ratio':>6} {'Envoy us/req':>13} {'added':>7} {'sidecar us/req':>15}",
    ]
    for name, label in PATHS.items():
        added = "" if name == "plain" else f"{median(name, 1) - plain_cpu:+7.1f}"
        own = f"{statistics.median(measured['sidecar_cpu']):15.1f}" if name == "main" else ""
        lines.append(
            f"  {label:<20} {median(name, 0):9.0f} {median(name, 0) / plain_rps:6.3f} {median(name, 1):13.1f} "
            f"{added:>7} {own}"
        )
    if workers == 1:
        ratio, added_cpu = median("inprocess", 0) / plain_rps, median("inprocess", 1) - plain_cpu
        lines.append(
            f"  in-process: ratio {ratio:.3f} (target >= 0.8), added Envoy CPU {added_cpu:.1f} us/request "
            "(target <= 15)"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", default="1,2", help="Envoy worker counts, comma-separated (default %(default)s)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("benchmark needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.workers.split(",")]
    os.environ["PYTHONPATH"] = str(ROOT)  # the plugin (tests.support) for the sidecar and Envoy's interpreter
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-inprocess-") as tmp:
        measured = {workers: run(workers, args, Path(tmp)) for workers in counts}
    print()
    for workers in counts:
        print("\n".join(summary(workers, measured[workers])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
