"""ext_proc overhead: wrk through Envoy alone vs Envoy + sidecar, interleaved in one run.

One Envoy (1 worker thread) carries five listeners: `plain` (router only), `main` (ext_proc -> the
sidecar on its default native transport -> router), `grpcio` (the same sidecar config run with
`--transport grpcio`), `floor` (ext_proc -> a trivial grpc.aio server that answers every message with a
constant, see trivial_extproc.py) and `backend` (a direct response the others route to), so all paths
share the same upstream and the same process. Each sidecar runs one worker on a Unix socket with a
plugin that adds one request header and one response header. Rounds alternate between the listeners so
machine noise hits all alike; the floor shows what grpc.aio itself costs.

    python benchmarks/extproc.py [--rounds 3] [--seconds 5] [--connections 16] [--tracing] [--access-log]
                                 [--baseline TREE]

`--tracing` adds a listener whose sidecar runs with `--tracing`, exporting every span to an OTLP receiver
in this process; `--access-log` one whose sidecar writes the access line (to a file). `--baseline TREE`
adds one whose sidecar is imported from another source tree (say `git archive main` unpacked): a change's
before and after, interleaved in one run.

Prints throughput per round, the ratio sidecar/plain (median of rounds), the sidecar's CPU time per
request (from /proc/PID/stat, all its threads), and wrk's p50/p99 latency.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.chains import Registry  # noqa: E402
from sidecar.config import SidecarConfig  # noqa: E402
from sidecar.stack.envoy import Envoy  # noqa: E402
from sidecar.stack.sidecar import SidecarProcess  # noqa: E402
from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.proc import cpu_seconds  # noqa: E402

PLUGIN = "tests.support.testplugins:AddHeaders"


def bootstrap(socket_path: Path, backend_port: int, others: dict[str, Path]) -> dict[str, Any]:
    """The sidecar's own bootstrap plus `plain`, `backend` and one ext_proc listener per entry of `others`."""
    from sidecar.config import ChainSpec, PluginSpec

    chains = (ChainSpec("default", (PluginSpec(PLUGIN),)),)
    config = SidecarConfig(chains=chains, listen=f"unix:{socket_path}", message_timeout=2.0)
    registry = Registry.from_specs(chains)
    result = build_bootstrap(registry, config, BootstrapOptions(listen_port=0, upstream=("127.0.0.1", backend_port)))
    listeners = result["static_resources"]["listeners"]
    plain = copy.deepcopy(listeners[0])
    plain["name"] = "plain"
    hcm = plain["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    backend = copy.deepcopy(plain)
    backend["name"] = "backend"
    backend["address"]["socket_address"]["port_value"] = backend_port
    backend_hcm = backend["filter_chains"][0]["filters"][0]["typed_config"]
    backend_hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
    ]
    for name, path in others.items():
        listener = copy.deepcopy(listeners[0])
        listener["name"] = name
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"][0]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = name
        cluster = copy.deepcopy(result["static_resources"]["clusters"][0])
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = name
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"pipe": {"path": str(path)}}}}
        ]
        listeners.append(listener)
        result["static_resources"]["clusters"].append(cluster)
    listeners += [plain, backend]
    return result


def wrk(url: str, seconds: int, connections: int) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

    def percentile(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return rps, percentile("50"), percentile("99"), total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tracing", action="store_true", help="add a sidecar with --tracing (spans to a receiver)")
    parser.add_argument("--access-log", action="store_true", help="add a sidecar with --access-log")
    parser.add_argument("--baseline", type=Path, help="add a sidecar imported from this source tree")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("benchmark needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = str(ROOT)
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()  # before the chdir below
    servers = {"main": "sidecar (native)", "grpcio": "sidecar (grpcio)", "floor": "trivial grpc.aio"}
    variants = {  # more native sidecars, each with its flags
        name: flags
        for name, flags, wanted in (
            ("baseline", [], args.baseline is not None),
            ("traced", ["--tracing"], args.tracing),
            ("access", ["--access-log"], args.access_log),
        )
        if wanted
    }
    servers |= {name: f"sidecar ({name})" for name in variants}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp, contextlib.ExitStack() as stack:
        # `python -m sidecar` puts its working directory first on sys.path, before PYTHONPATH: start the
        # sidecars from a directory without a `sidecar` package, or the baseline imports this tree.
        os.chdir(tmp)
        sockets = {name: Path(tmp) / f"{name}.sock" for name in servers}
        sidecar = SidecarProcess(["--plugin", PLUGIN, "--listen", f"unix:{sockets['main']}"], [sockets["main"]])
        grpcio = SidecarProcess(
            ["--plugin", PLUGIN, "--listen", f"unix:{sockets['grpcio']}", "--transport", "grpcio"], [sockets["grpcio"]]
        )
        extra = _start_variants(variants, sockets, args.baseline, Path(tmp), stack)
        floor = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "trivial_extproc.py"), str(sockets["floor"])],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            sidecar.start()
            grpcio.start()
            assert floor.stdout is not None and floor.stdout.readline().strip() == "ready"
            others = {name: sockets[name] for name in ("grpcio", "floor", *variants)}
            with Envoy(bootstrap(sockets["main"], free_port(), others), concurrency=1) as envoy:
                urls = {}
                for name in ("plain", *servers):
                    host, port = envoy.listener_address(name)
                    urls[name] = f"http://{host}:{port}/"
                for name in servers:  # warm-up: connections, caches, allocators
                    wrk(urls[name], 1, args.connections)
                pids = {"main": sidecar.pid, "grpcio": grpcio.pid, "floor": floor.pid}
                pids |= {name: proc.pid for name, proc in extra.items()}
                results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in urls}
                cpu_per_request: dict[str, list[float]] = {name: [] for name in servers}
                for round_no in range(1, args.rounds + 1):
                    for name in urls:
                        before = cpu_seconds(pids[name]) if name in pids else 0.0
                        rps, p50, p99, total = wrk(urls[name], args.seconds, args.connections)
                        results[name].append((rps, p50, p99))
                        line = f"round {round_no} {name:<6} {rps:9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
                        if name in pids:
                            cpu_per_request[name].append((cpu_seconds(pids[name]) - before) / total * 1e6)
                            line += f"  server CPU {cpu_per_request[name][-1]:5.0f} us/req"
                        print(line, flush=True)
        finally:
            sidecar.close()
            grpcio.close()
            floor.terminate()
            floor.wait(10)
            if floor.stdout is not None:
                floor.stdout.close()

    def median(name: str, index: int) -> float:
        return statistics.median(r[index] for r in results[name])

    plain_rps = median("plain", 0)
    print()
    print(f"{'':<18} {'req/s':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10}")
    print(f"{'Envoy alone':<18} {plain_rps:9.0f} {1:6.3f} {median('plain', 1):7.2f} {median('plain', 2):7.2f}")
    for name, label in servers.items():
        cpu = statistics.median(cpu_per_request[name])
        print(
            f"{label:<18} {median(name, 0):9.0f} {median(name, 0) / plain_rps:6.3f} {median(name, 1):7.2f}"
            f" {median(name, 2):7.2f} {cpu:10.0f}"
        )
    print()
    print(
        f"sidecar: throughput ratio {median('main', 0) / plain_rps:.3f} (target >= 0.2), "
        f"CPU {statistics.median(cpu_per_request['main']):.0f} us/request (target <= 250)"
    )
    main_cpu = statistics.median(cpu_per_request["main"])
    for name in variants:  # what each variant costs against the plain native sidecar, same run
        cpu = statistics.median(cpu_per_request[name])
        print(f"{name}: CPU {cpu:.1f} us/request vs {main_cpu:.1f} ({(cpu / main_cpu - 1) * 100:+.1f}%)")
    return 0


def _start_variants(
    variants: dict[str, list[str]],
    sockets: dict[str, Path],
    baseline: Path | None,
    tmp: Path,
    stack: contextlib.ExitStack,
) -> dict[str, SidecarProcess]:
    """The extra sidecars, started; closed with `stack`. The traced one exports to a receiver in this process."""
    started = {}
    for name, flags in variants.items():
        env = dict(os.environ)
        if name == "baseline":
            assert baseline is not None
            env["PYTHONPATH"] = str(baseline.resolve())
        if name == "traced":
            from tests.support.otlp import otlp_receiver

            _receiver, port = stack.enter_context(otlp_receiver())
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        proc = SidecarProcess(
            ["--plugin", PLUGIN, "--listen", f"unix:{sockets[name]}", *flags], [sockets[name]], log_path=tmp / name
        )
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)  # SidecarProcess passes this process's environment on
        try:
            started[name] = stack.enter_context(proc)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return started


if __name__ == "__main__":
    sys.exit(main())
