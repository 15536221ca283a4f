from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import prometheus_client
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry, generate_latest

from sidecar import Counter, Gauge, Histogram, Respond, instruments
from sidecar.chains import Registry
from sidecar.config import TRANSPORTS, ChainSpec, PluginSpec, SidecarConfig
from sidecar.errors import ConfigError
from sidecar.extproc import metrics as metrics_module
from sidecar.extproc.metrics import Metrics, MetricsCollector, read_snapshots
from sidecar.extproc.server import ExtProcServer
from sidecar.stack.sidecar import SidecarProcess
from sidecar.testing import EnvoyHarness
from sidecar.wire import CHAIN_METADATA_KEY
from tests.support.messages import headers_message
from tests.support.meterplugins import MP
from tests.support.net import free_port
from tests.support.testplugins import TP
from tests.support.wait import wait_for, wait_until


def scrape(source: Metrics | dict[str, object]) -> str:
    registry = CollectorRegistry()
    registry.register(MetricsCollector(source.snapshot if isinstance(source, Metrics) else lambda: source))
    return generate_latest(registry).decode()


def test_counts_and_histogram_exposition() -> None:
    metrics = Metrics()
    metrics.stream_opened("default")
    metrics.stream_opened("default")
    metrics.stream_closed()
    metrics.observe("request_headers", 0.0003)
    metrics.observe("request_headers", 2.0)
    metrics.plugin_error("redact", "request_body")
    metrics.stream_error("protocol")
    text = scrape(metrics)
    assert 'sidecar_extproc_streams_total{chain="default"} 2.0' in text
    assert "sidecar_extproc_streams_active 1.0" in text
    assert 'sidecar_extproc_messages_total{phase="request_headers"} 2.0' in text
    assert 'sidecar_extproc_phase_seconds_bucket{le="0.00025",phase="request_headers"} 0.0' in text
    assert 'sidecar_extproc_phase_seconds_bucket{le="0.0005",phase="request_headers"} 1.0' in text
    assert 'sidecar_extproc_phase_seconds_bucket{le="1.0",phase="request_headers"} 1.0' in text
    assert 'sidecar_extproc_phase_seconds_bucket{le="+Inf",phase="request_headers"} 2.0' in text
    assert 'sidecar_extproc_phase_seconds_sum{phase="request_headers"} 2.0003' in text
    assert 'sidecar_plugin_errors_total{phase="request_body",plugin="redact"} 1.0' in text
    assert 'sidecar_extproc_stream_errors_total{reason="protocol"} 1.0' in text


def test_worker_snapshots_sum_and_dead_workers_keep_their_counts(tmp_path: Path) -> None:
    live, dead = Metrics(), Metrics()
    for metrics, n in ((live, 3), (dead, 4)):
        for _ in range(n):
            metrics.stream_opened("default")
            metrics.observe("response_headers", 0.001)
    live.write_snapshot(tmp_path / "100.json")
    dead.write_snapshot(tmp_path / "200.json")
    (tmp_path / "300.json").write_text("{half a file")  # being replaced: skipped, not fatal
    total = read_snapshots(tmp_path, live_pids={100})
    assert total["streams"] == {"default": 7}
    assert total["active"] == 3  # the dead worker's open streams are gone
    assert sum(total["latency"]["response_headers"]) == 7
    assert json.loads((tmp_path / "100.json").read_text())["active"] == 3
    assert 'sidecar_extproc_streams_total{chain="default"} 7.0' in scrape(total)


def test_plugin_latency_responses_and_process_usage_are_exposed() -> None:
    metrics = Metrics()
    metrics.plugin_ran("auth", "request_headers", 0.0002, None)
    metrics.plugin_ran("auth", "request_headers", 0.003, Respond(401))
    metrics.plugin_ran("auth", "request_headers", 0.003, Respond(429))
    metrics.plugin_ran("auth", "request_headers", 0.003, Respond(401))
    metrics.plugin_ran("redact", "response_body", 0.04, RuntimeError("x"))
    text = scrape(metrics)
    assert 'sidecar_plugin_seconds_count{phase="request_headers",plugin="auth"} 4.0' in text
    assert 'sidecar_plugin_seconds_bucket{le="0.00025",phase="request_headers",plugin="auth"} 1.0' in text
    assert 'sidecar_plugin_seconds_bucket{le="0.05",phase="response_body",plugin="redact"} 1.0' in text
    assert 'sidecar_plugin_responses_total{plugin="auth",status="401"} 2.0' in text
    assert 'sidecar_plugin_responses_total{plugin="auth",status="429"} 1.0' in text
    assert 'plugin="redact",status=' not in text  # an exception is an error, not a response
    rss = re.search(r'sidecar_worker_resident_memory_bytes\{worker="0"\} (\S+)', text)
    fds = re.search(r'sidecar_worker_open_fds\{worker="0"\} (\S+)', text)
    cpu = re.search(r'sidecar_worker_cpu_seconds_total\{worker="0"\} (\S+)', text)
    assert rss and float(rss.group(1)) > 1e6
    assert fds and float(fds.group(1)) >= 3
    assert cpu and float(cpu.group(1)) > 0


def test_plugin_instruments_merge_across_workers(tmp_path: Path) -> None:
    hits = Counter("merge_test_hits", "hits", labels=("route",))
    queue = Gauge("merge_test_queue", "queued")
    sizes = Histogram("merge_test_sizes", "sizes", buckets=(1, 10))
    hits.inc(route="a")
    hits.inc(2, route="b")
    queue.set(3)
    sizes.observe(5)
    sizes.observe(50)
    worker = Metrics().snapshot()
    (tmp_path / "100.json").write_text(json.dumps(worker))
    (tmp_path / "200.json").write_text(json.dumps(worker))  # the same numbers from a dead worker
    text = scrape(read_snapshots(tmp_path, live_pids={100}))
    assert 'merge_test_hits_total{route="a"} 2.0' in text
    assert 'merge_test_hits_total{route="b"} 4.0' in text
    assert "merge_test_queue 3.0" in text  # gauges: the live workers only
    assert 'merge_test_sizes_bucket{le="10.0"} 2.0' in text
    assert 'merge_test_sizes_bucket{le="+Inf"} 4.0' in text
    assert "merge_test_sizes_sum 110.0" in text
    assert "merge_test_sizes_count 4.0" in text


def test_instrument_declarations_are_checked() -> None:
    for name in ("sidecar_mine", "process_mine", "python_x", "9lives", "has-dash", "", "x" * 300):
        with pytest.raises(ConfigError, match="metric name"):
            Counter(name, "bad")
    with pytest.raises(ConfigError, match="label"):
        Counter("decl_test_a", "bad", labels=("le",))
    with pytest.raises(ConfigError, match="repeat"):
        Counter("decl_test_b", "bad", labels=("x", "x"))
    with pytest.raises(ConfigError, match="buckets"):
        Histogram("decl_test_c", "bad", buckets=(2, 1))
    with pytest.raises(ConfigError, match="buckets"):
        Histogram("decl_test_d", "bad", buckets=(float("nan"),))
    first = Counter("decl_test_shared", "one", labels=("x",))
    second = Counter("decl_test_shared", "one", labels=("x",))  # the same plugin in two chains
    first.inc(x="1")
    second.inc(x="1")
    assert instruments.snapshot()["decl_test_shared"]["series"] == {'["1"]': 2.0}
    with pytest.raises(ConfigError, match="declared twice"):
        Gauge("decl_test_shared", "other", labels=("x",))
    with pytest.raises(ConfigError, match="declared twice"):
        Counter("decl_test_shared", "other", labels=("y",))


def test_instrument_updates_are_checked_and_series_bounded() -> None:
    counter = Counter("bound_test_hits", "hits", labels=("user",))
    with pytest.raises(ValueError, match="expected labels"):
        counter.inc()
    with pytest.raises(ValueError, match="expected labels"):
        counter.inc(other="x")
    with pytest.raises(ValueError, match="go down"):
        counter.inc(-1, user="a")
    with pytest.raises(ValueError, match="finite"):
        counter.inc(float("inf"), user="a")
    with pytest.raises(ValueError, match="finite"):
        Gauge("bound_test_gauge", "g").set(float("nan"))
    for i in range(instruments.MAX_SERIES + 25):  # a label fed from request data
        counter.inc(user=f"user-{i}")
    counter.inc(user="user-0")  # an existing series still counts
    snap = instruments.snapshot()["bound_test_hits"]
    assert len(snap["series"]) == instruments.MAX_SERIES
    assert snap["series"]['["user-0"]'] == 2.0
    assert snap["dropped"] == 25
    assert 'sidecar_plugin_metric_series_dropped_total{metric="bound_test_hits"} 25.0' in scrape(Metrics())
    counter.inc(user="x" * 10_000)  # dropped too (full), and never a 10 kB label
    assert all(len(json.loads(key)[0]) <= 256 for key in instruments.snapshot()["bound_test_hits"]["series"])


def _scrape_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _value(text: str, sample: str) -> float | None:
    match = re.search(r"(?m)^" + re.escape(sample) + r" (\S+)$", text)
    return float(match.group(1)) if match else None


def test_two_workers_sum_plugin_metrics_responses_and_restarts(tmp_path: Path) -> None:
    """Through the real server: `sidecar serve --workers 2`, each worker driven over its own socket."""
    port = free_port()
    sock = tmp_path / "s.sock"
    sockets = [tmp_path / "s-0.sock", tmp_path / "s-1.sock"]
    args = ["--plugin", f"{MP}Metered", "--listen", f"unix:{sock}", "--workers", "2", "--metrics", f"127.0.0.1:{port}"]
    url = f"http://127.0.0.1:{port}/metrics"
    with SidecarProcess(args, sockets) as proc:
        plan = {0: [(), (), (), (("x-deny", b"1"),), (("x-deny", b"1"),)], 1: [(), (), (("x-boom", b"1"),)]}
        for index, requests in plan.items():
            with grpc.insecure_channel(f"unix:{sockets[index]}") as channel:
                client = pb_grpc.ExternalProcessorStub(channel)
                for pairs in requests:
                    list(client.Process(iter([headers_message((":path", b"/abcdef"), *pairs)]), timeout=5))

        def summed() -> bool:
            return _value(_scrape_url(url), 'test_requests_seen_total{verdict="pass"}') == 5.0

        wait_for(summed, what="both workers' plugin counters in the supervisor's scrape")
        text = _scrape_url(url)
        assert _value(text, 'test_requests_seen_total{verdict="deny"}') == 2.0
        assert _value(text, 'test_requests_seen_total{verdict="boom"}') == 1.0
        assert _value(text, "test_plugins_loaded") == 2.0  # one per live worker
        # A plugin's own prometheus_client metrics: summed too, once (the supervisor's unused copies are not shown).
        assert _value(text, 'test_legacy_requests_total{verdict="any"}') == 8.0
        assert _value(text, 'test_legacy_seconds_bucket{le="1.0"}') == 8.0
        assert _value(text, "test_legacy_seconds_count") == 8.0
        assert text.count("# TYPE test_legacy_requests_total counter") == 1
        assert _value(text, "process_open_fds") is not None  # the supervisor's own process metrics stay
        assert _value(text, 'test_path_bytes_bucket{le="16.0"}') == 8.0
        assert _value(text, 'sidecar_plugin_responses_total{plugin="metered",status="401"}') == 2.0
        assert _value(text, 'sidecar_plugin_seconds_count{phase="request_headers",plugin="metered"}') == 8.0
        assert _value(text, 'sidecar_plugin_errors_total{phase="request_headers",plugin="metered"}') == 1.0
        for worker in ("0", "1"):
            assert (_value(text, f'sidecar_worker_resident_memory_bytes{{worker="{worker}"}}') or 0) > 1e6
            assert (_value(text, f'sidecar_worker_open_fds{{worker="{worker}"}}') or 0) >= 3
        assert _value(text, "sidecar_worker_restarts_total") == 0.0

        pids = [int(m) for m in re.findall(r'"worker": 1, "pid": (\d+)', proc.logs())]
        assert pids, proc.logs()
        os.kill(pids[-1], signal.SIGKILL)

        def restarted() -> bool:
            text = _scrape_url(url)
            return _value(text, "sidecar_worker_restarts_total") == 1.0 and _value(text, "test_plugins_loaded") == 2.0

        wait_for(restarted, what="the restart counted and the new worker's gauge in place of the dead one's")
        proc.wait_serving()
        text = _scrape_url(url)
        assert _value(text, 'test_requests_seen_total{verdict="pass"}') == 5.0  # the dead worker's counts stay
        assert _value(text, 'test_legacy_requests_total{verdict="any"}') == 8.0
        assert _value(text, 'sidecar_plugin_responses_total{plugin="metered",status="401"}') == 2.0


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stream_the_client_cancels_is_counted(tmp_path: Path, transport: str) -> None:
    """Envoy resets a stream whose message_timeout passed: the sidecar counts it as `cancelled`."""
    metrics = Metrics()
    registry = Registry.from_specs((ChainSpec("default", (PluginSpec(f"{TP}Slow"),)),))
    sock = tmp_path / "s.sock"
    config = SidecarConfig(listen=f"unix:{sock}", transport=transport)
    server = ExtProcServer(registry, config, socket_path=sock, metrics=metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=0.2)
            await call.write(headers_message(("x-delay", b"30")))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: metrics.stream_errors.get("cancelled") == 1)
        assert metrics.active == 0
    finally:
        await server.stop(1)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reset_after_an_immediate_response_is_no_error(tmp_path: Path, transport: str) -> None:
    """Envoy resets the stream once it has an immediate response: that is the stream's normal end."""
    metrics = Metrics()
    registry = Registry.from_specs((ChainSpec("default", (PluginSpec(f"{MP}Metered"),)),))
    sock = tmp_path / "s.sock"
    config = SidecarConfig(listen=f"unix:{sock}", transport=transport)
    server = ExtProcServer(registry, config, socket_path=sock, metrics=metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=5)
            await call.write(headers_message(("x-deny", b"1")))
            reply = await call.read()
            assert reply.immediate_response.status.code == 401
            await wait_until(lambda: metrics.active == 1)
            call.cancel()
            await wait_until(lambda: metrics.active == 0)
        assert "cancelled" not in metrics.stream_errors
        assert metrics.responses == {("metered", 401): 1}
    finally:
        await server.stop(1)


@pytest.mark.asyncio
@pytest.mark.parametrize("chains", [("default",), ("default", "other")])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stream_naming_an_unknown_chain_fails_closed(
    tmp_path: Path, chains: tuple[str, ...], transport: str
) -> None:
    """With one chain as with several: a route meant for another chain never runs this one's plugins."""
    metrics = Metrics()
    specs = tuple(ChainSpec(name, (PluginSpec(f"{TP}AddHeaders"),)) for name in chains)
    sock = tmp_path / "s.sock"
    config = SidecarConfig(listen=f"unix:{sock}", transport=transport)
    server = ExtProcServer(Registry.from_specs(specs), config, socket_path=sock, metrics=metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            client = pb_grpc.ExternalProcessorStub(channel)
            for metadata in ((), ((CHAIN_METADATA_KEY, "default"),)):
                call = client.Process(iter([headers_message()]), metadata=metadata, timeout=5)
                (reply,) = [reply async for reply in call]
                assert reply.request_headers.response.header_mutation.set_headers
            for name in ("nope", "", "DEFAULT", "defaultx"):
                # No message: the server refuses the stream on its metadata, with no send racing the refusal.
                call = client.Process(iter(()), metadata=((CHAIN_METADATA_KEY, name),), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [reply async for reply in call]
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == "unknown plugin chain"
        assert metrics.stream_errors["unknown_chain"] == 4
    finally:
        await server.stop(1)


@pytest.mark.envoy
def test_streams_envoy_gives_up_on_are_counted_and_responses_are_not(
    sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path
) -> None:
    """Through a real Envoy: a plugin past message_timeout is a `cancelled` stream (Envoy answers 504);
    a Respond, after which Envoy resets the stream too, is a response and no error."""
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"message_timeout: 0.25\nmetrics: 127.0.0.1:{port}\nplugins: ['{MP}Metered', '{TP}Slow']\n")
    harness = sidecar_envoy(config=config)
    assert httpx.get(harness.url + "/", headers={"x-delay": "1.0"}, timeout=10).status_code == 504
    assert httpx.get(harness.url + "/", headers={"x-deny": "1"}, timeout=10).status_code == 401
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for(lambda: _value(_scrape_url(url), 'sidecar_extproc_stream_errors_total{reason="cancelled"}') == 1.0)
    text = _scrape_url(url)
    assert _value(text, 'sidecar_plugin_responses_total{plugin="metered",status="401"}') == 1.0
    assert _value(text, 'sidecar_plugin_seconds_count{phase="request_headers",plugin="slow"}') is None  # cut short


def test_the_number_of_instruments_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin building metric names from request data cannot grow a process's metrics forever."""
    monkeypatch.setattr(instruments, "MAX_INSTRUMENTS", len(instruments.declared()) + 2)
    Counter("cap_test_a", "a")
    Counter("cap_test_b", "b")
    with pytest.raises(ConfigError, match="already has"):
        Counter("cap_test_c", "c")
    assert Counter("cap_test_a", "a") is not None  # declaring an existing one again still works


def test_a_workers_prometheus_client_registry_is_published_bounded_and_summed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hits = prometheus_client.Counter("registry_test_hits", "hits", ["user"])
    depth = prometheus_client.Gauge("registry_test_depth", "depth")
    for i in range(20):
        hits.labels(f"u{i}").inc()
    depth.set(5)
    worker = Metrics()
    worker.publish_registry = True
    snap = worker.snapshot()
    assert not any(name.startswith(("process_", "python_")) for name in snap["registry"])  # per process
    assert not any("_created" in key for key in snap["registry"]["registry_test_hits"]["samples"])
    (tmp_path / "100.json").write_text(json.dumps(snap))
    (tmp_path / "200.json").write_text(json.dumps(snap))  # a dead worker: its counters count, its gauges not
    text = scrape(read_snapshots(tmp_path, live_pids={100}))
    assert 'registry_test_hits_total{user="u7"} 2.0' in text
    assert "registry_test_depth 5.0" in text
    monkeypatch.setattr(metrics_module, "MAX_REGISTRY_SAMPLES", 5)
    bounded = metrics_module.registry_samples()
    assert sum(len(family["samples"]) for family in bounded.values()) == 5


def test_a_plugin_collector_that_raises_is_left_out_and_the_rest_still_published(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = prometheus_client.Gauge("raising_test_depth", "depth")
    broken.set_function(lambda: 1 / 0)  # a plugin's callback that fails on every publish
    kept = prometheus_client.Counter("raising_test_kept", "kept")
    kept.inc(3)
    try:
        worker = Metrics()
        worker.publish_registry = True
        with caplog.at_level("WARNING", logger="sidecar.metrics"):
            for _ in range(3):
                snap = worker.snapshot()
        assert "raising_test_depth" not in snap["registry"]
        assert snap["registry"]["raising_test_kept"]["samples"]
        warnings = [r for r in caplog.records if "collector raised" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited: not one line per publish
        assert "ZeroDivisionError" in warnings[0].getMessage()
    finally:
        prometheus_client.REGISTRY.unregister(broken)
        prometheus_client.REGISTRY.unregister(kept)


@pytest.mark.asyncio
async def test_a_publish_that_fails_leaves_the_publisher_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar.extproc import server as server_module

    metrics = Metrics()
    snapshot_file = tmp_path / "1.json"
    specs = (ChainSpec("default", (PluginSpec(f"{TP}AddHeaders"),)),)
    server = ExtProcServer(
        Registry.from_specs(specs), SidecarConfig(), socket_path=None, metrics=metrics, snapshot_file=snapshot_file
    )
    threads: list[str] = []

    def write(path: Path, snap: dict[str, object]) -> None:
        import threading

        threads.append(threading.current_thread().name)
        metrics_module.write_snapshot(path, snap)

    monkeypatch.setattr(server_module, "write_snapshot", write)
    monkeypatch.setattr(metrics, "snapshot", lambda: {"bad": object()})  # json cannot write it
    with caplog.at_level("WARNING", logger="sidecar.extproc"):
        await server._publish()  # returns: the publisher's loop goes on
    assert "cannot publish metrics" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(server_module, "write_snapshot", write)
    await server._publish()
    assert json.loads(snapshot_file.read_text())["streams"] == {}
    assert threads and all(name != "MainThread" for name in threads)  # serialised off the event loop


def test_a_nul_in_a_label_value_stays_in_its_own_label() -> None:
    hits = Counter("nul_test_hits", "h", labels=("tenant", "route"))
    hits.inc(tenant="evil\0admin", route="/x")
    hits.inc(tenant="evil", route="admin\0/x")
    latency = Histogram("nul_test_latency", "l", labels=("tenant",))
    latency.observe(0.1, tenant="a\0b")
    series = instruments.snapshot()["nul_test_hits"]["series"]
    assert len(series) == 2  # two label sets, not one merged
    assert sorted(json.loads(key) for key in series) == [["evil", "admin\0/x"], ["evil\0admin", "/x"]]
    text = scrape(Metrics())
    hits_lines = [line for line in text.splitlines() if line.startswith("nul_test_hits_total")]
    assert len(hits_lines) == 2
    assert any('tenant="evil"' in line for line in hits_lines)
    assert all(line.endswith(" 1.0") for line in hits_lines)
    assert sum(line.startswith("nul_test_latency_count") for line in text.splitlines()) == 1


def test_the_plugin_series_of_a_process_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instruments, "MAX_PROCESS_SERIES", instruments._series_kept[0] + 3)
    first = Counter("proc_cap_test_a", "a", labels=("k",))
    second = Histogram("proc_cap_test_b", "b", labels=("k",))
    for i in range(4):
        first.inc(k=str(i))  # 3 kept, the 4th dropped
    for i in range(4):
        second.observe(1.0, k=str(i))  # all dropped: the process is full
    first.inc(k="0")  # an existing series still counts
    snap = instruments.snapshot()
    assert len(snap["proc_cap_test_a"]["series"]) == 3
    assert snap["proc_cap_test_a"]["series"]['["0"]'] == 2.0
    assert snap["proc_cap_test_a"]["dropped"] == 1
    assert snap["proc_cap_test_b"]["series"] == {}
    assert snap["proc_cap_test_b"]["dropped"] == 4


def test_dead_workers_snapshots_are_folded_into_one_file(tmp_path: Path) -> None:
    def worker(streams: int) -> Metrics:
        metrics = Metrics()
        for _ in range(streams):
            metrics.stream_opened("default")
        return metrics

    worker(3).write_snapshot(tmp_path / "100.json")
    worker(4).write_snapshot(tmp_path / "200.json")
    worker(5).write_snapshot(tmp_path / "300.json")
    metrics_module.fold_retired(tmp_path, live_pids={100})
    assert sorted(path.name for path in tmp_path.glob("*.json")) == ["100.json", metrics_module.RETIRED]
    total = read_snapshots(tmp_path, live_pids={100})
    assert total["streams"] == {"default": 12}
    assert total["active"] == 3  # only the live worker's streams are open
    for pid in range(400, 420):  # a worker crash-looping: still one file
        worker(1).write_snapshot(tmp_path / f"{pid}.json")
        metrics_module.fold_retired(tmp_path, live_pids={100})
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert read_snapshots(tmp_path, live_pids={100})["streams"] == {"default": 32}
