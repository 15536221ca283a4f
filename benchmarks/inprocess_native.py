"""The in-process module's own cost: wrk through one Envoy (1 worker) with four listeners, interleaved rounds.

    plain   router only
    none    the module loaded, Python never called (phases 0): Envoy's dynamic-module filter and our C hooks
    noop    request and response headers copied to Python, hooks that return None (plus new_stream and close)
    stamp   the same, setting one header each way (the issue's header-stamp plugin, without the plugin layer)

All route to a fifth listener answering 200 itself, so Envoy's CPU per request (from /proc/PID/stat, every
thread: the interpreter runs on Envoy's worker) covers both sides of the proxy. The Python side is the fake
bridge of tests/support/inprocess_fake.py: this measures the native module, not the plugin layer.

The module is compiled again for this run with SIDECAR_HOOK_TIMING, which times every headers hook from the
inside (thread CPU and wall clock, two clock reads of about 0.3 us each included, as in the spike that measured
0.29 us for a C-only hook and 0.51 us for one calling Python); the installed module is not touched.

    python benchmarks/inprocess_native.py [--rounds 3] [--seconds 5] [--connections 16] [--baseline REV]

--baseline REV also builds module.c (and abi.h) as they are at git revision REV, runs it in a second Envoy, and
interleaves the rounds of both, so a change to the module is measured before and after in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.inprocess import module  # noqa: E402
from sidecar.stack.envoy import Envoy  # noqa: E402
from tests.support import inprocess_fake  # noqa: E402
from tests.support.load import direct_response_listener  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.proc import cpu_seconds  # noqa: E402

NAMES = ("plain", "none", "noop", "stamp")
_HCM = "envoy.filters.network.http_connection_manager"


def listener(name: str, backend_port: int, config_path: Path) -> dict[str, Any]:
    proxy = direct_response_listener(name, 0)
    hcm = proxy["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]
    if name != "plain":
        hcm["http_filters"].insert(0, module.http_filter(config_path, name, factory=inprocess_fake.FACTORY))
    return proxy


def bootstrap(backend_port: int, config_path: Path) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}
    return {
        "static_resources": {
            "listeners": [
                direct_response_listener("backend", backend_port),
                *(listener(n, backend_port, config_path) for n in NAMES),
            ],
            "clusters": [
                {
                    "name": "backend",
                    "connect_timeout": "2s",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                    },
                }
            ],
        }
    }


def baseline_sources(revision: str, directory: Path) -> Path:
    """module.c and abi.h as they are at git `revision`, in `directory`."""
    for name in ("module.c", "abi.h"):
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:sidecar/inprocess/native/{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (directory / name).write_text(text)
    return directory


def build_timed_module(directory: Path, native: Path = ROOT / "sidecar" / "inprocess" / "native") -> None:
    """The module with SIDECAR_HOOK_TIMING, built as setup.py builds it, from `native` into `directory`."""
    libdir = sysconfig.get_config_var("LIBDIR")
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-fPIC",
            "-shared",
            "-DSIDECAR_HOOK_TIMING",
            f'-DSIDECAR_LIBPYTHON="{sysconfig.get_config_var("INSTSONAME")}"',
            f"-I{native}",
            f"-I{sysconfig.get_paths()['include']}",
            "-o",
            str(directory / f"lib{module.MODULE_NAME}.so"),
            str(native / "module.c"),
            f"-L{libdir}",
            f"-lpython{sysconfig.get_config_var('LDVERSION')}",
            f"-Wl,-rpath,{libdir}",
            "-Wl,-z,now",
        ],
        check=True,
    )


def hook_timings(log: str) -> dict[str, tuple[float, float]]:
    """The last `hook timing` line per chain: (CPU ns, wall ns) per headers hook."""
    found = {}
    for match in re.finditer(r"hook timing (\S+) calls=\d+ cpu_ns=(\d+) wall_ns=(\d+)", log):
        found[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    return found


def wrk(url: str, seconds: int, connections: int) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out:
        raise SystemExit(f"{url}: non-2xx answers:\n{out}")
    return rps, total


def measure(pids: dict[str, int], urls: dict[str, dict[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds over every (build, listener): req/s and Envoy CPU per request, each a list per round."""
    for by_name in urls.values():
        for url in by_name.values():
            wrk(url, 1, args.connections)  # warm-up
    rps: dict[tuple[str, str], list[float]] = {(b, n): [] for b in urls for n in NAMES}
    cpu: dict[tuple[str, str], list[float]] = {(b, n): [] for b in urls for n in NAMES}
    for round_ in range(args.rounds):
        for build, by_name in urls.items():
            for name in NAMES:
                before = cpu_seconds(pids[build])
                rate, total = wrk(by_name[name], args.seconds, args.connections)
                cpu[build, name].append((cpu_seconds(pids[build]) - before) / total * 1e6)
                rps[build, name].append(rate)
                print(
                    f"round {round_ + 1} {build:8} {name:6} {rate:9.0f} req/s  {cpu[build, name][-1]:6.1f} us CPU/req",
                    flush=True,
                )
    return {"rps": rps, "cpu": cpu}


def report(build: str, seen: dict[str, Any], timings: dict[str, tuple[float, float]]) -> None:
    rps, cpu = seen["rps"], seen["cpu"]
    plain_rps, plain_cpu = statistics.median(rps[build, "plain"]), statistics.median(cpu[build, "plain"])
    print(f"\n{build}: medians  req/s  ratio  Envoy CPU/req  added    in a headers hook: CPU   wall")
    for name in NAMES:
        r, c = statistics.median(rps[build, name]), statistics.median(cpu[build, name])
        inside = "".join(f"  {ns / 1000:6.2f} us" for ns in timings.get(name, ()))
        print(f"{name:8} {r:9.0f}  {r / plain_rps:5.2f}  {c:9.1f} us  {c - plain_cpu:+6.1f} us        {inside}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--baseline", metavar="REV", help="also measure the module as it is at this git revision")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("benchmark needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    module.module_search_path()  # the installed one must exist: this measures what users get
    with tempfile.TemporaryDirectory(prefix="inprocess-bench-") as tmp, contextlib.ExitStack() as stack:
        builds = {"current": Path(tmp) / "current"}
        if args.baseline:
            builds = {"baseline": Path(tmp) / "baseline", **builds}
        envoys: dict[str, Envoy] = {}
        for build, directory in builds.items():
            directory.mkdir()
            sources = ROOT / "sidecar" / "inprocess" / "native"
            if build == "baseline":
                (Path(tmp) / "baseline-src").mkdir()
                sources = baseline_sources(args.baseline, Path(tmp) / "baseline-src")
            build_timed_module(directory, sources)
            os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(directory)
            envoys[build] = stack.enter_context(Envoy(bootstrap(free_port(), directory / "unused.yaml"), concurrency=1))
        pids = {build: envoy._proc.pid for build, envoy in envoys.items()}  # type: ignore[union-attr]
        urls = {
            build: {n: "http://{}:{}/".format(*envoy.listener_address(n)) for n in NAMES}
            for build, envoy in envoys.items()
        }
        seen = measure(pids, urls, args)
        timings = {build: hook_timings(envoy.logs()) for build, envoy in envoys.items()}
    for build in builds:
        report(build, seen, timings[build])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
