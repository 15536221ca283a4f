"""The in-process Prometheus endpoint: the bridge's per-plugin numbers on the config file's `metrics` address,
served from the bridge's loop thread, against hostile scrapers too; and through real Envoy (both failure
policies, a reply, a failure), scraped as Prometheus would."""

from __future__ import annotations

import socket
import sysconfig
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.errors import ConfigError
from sidecar.inprocess import bridge
from sidecar.inprocess.endpoint import MAX_CONNECTIONS, MAX_REQUEST_HEAD, Endpoint
from sidecar.inprocess.loop import LoopThread, shared_loop
from sidecar.inprocess.meters import Meters
from sidecar.testing import EnvoyHarness, Request
from tests.support.inprocess_double import InProcessDouble
from tests.support.net import free_port
from tests.support.wait import wait_for

TP = "tests.support.testplugins:"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels): parsed as Prometheus parses it."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def endpoint() -> Iterator[tuple[Endpoint, Meters]]:
    meters = Meters()
    served = Endpoint("127.0.0.1:0", meters, shared_loop(), registry=CollectorRegistry(), read_timeout=0.3)
    served.start()
    yield served, meters
    served.close()


def _raw(port: int, data: bytes) -> bytes:
    """What the endpoint answers to `data` before it closes (a reset, for unread data, is a close too)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        try:
            conn.sendall(data)
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def test_a_scrape_shows_the_per_plugin_numbers(endpoint: tuple[Endpoint, Meters]) -> None:
    served, meters = endpoint
    meters.plugin_ran("gate", "request_headers", 0.0002)
    meters.plugin_ran("gate", "request_headers", 0.002)
    meters.plugin_error("gate", "request_body")
    meters.streams_of("default")[0] += 3
    meters.rejected_mutations += 2
    answer = httpx.get(f"http://127.0.0.1:{served.port}/metrics", timeout=5)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    seen = samples(answer.text)
    gate = (("phase", "request_headers"), ("plugin", "gate"))
    assert seen["sidecar_plugin_seconds_count", gate] == 2
    assert seen["sidecar_plugin_seconds_bucket", (("le", "0.00025"), *gate)] == 1
    assert seen["sidecar_plugin_errors_total", (("phase", "request_body"), ("plugin", "gate"))] == 1
    assert seen["sidecar_extproc_streams_total", (("chain", "default"),)] == 3
    assert seen["sidecar_inprocess_rejected_header_mutations_total", ()] == 2


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\ncontent-length: 0\r\n\r\n", b"405"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),  # a TLS hello where HTTP was expected
        (b"GET /metrics HTTP/1.1\r\nx-pad: " + b"a" * (2 * MAX_REQUEST_HEAD) + b"\r\n\r\n", b"431"),
        (b"GET /metr", b""),  # a head that never ends: closed after the read timeout, unanswered
    ],
)
def test_a_hostile_scrape_gets_one_bounded_answer_and_the_endpoint_keeps_serving(
    endpoint: tuple[Endpoint, Meters], request_bytes: bytes, status: bytes
) -> None:
    served, _ = endpoint
    answer = _raw(served.port, request_bytes)
    assert answer[9:12] == status and len(answer) < 1024
    assert httpx.get(f"http://127.0.0.1:{served.port}/metrics", timeout=5).status_code == 200


def test_connections_past_the_bound_are_closed_and_the_rest_still_served(endpoint: tuple[Endpoint, Meters]) -> None:
    served, _ = endpoint
    # MAX_CONNECTIONS that send nothing hold their slots until the read timeout; the next is closed at once.
    idle = [socket.create_connection(("127.0.0.1", served.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        wait_for(lambda: served._open == MAX_CONNECTIONS, 5, "every idle connection held")
        assert _raw(served.port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
    finally:
        for conn in idle:
            conn.close()
    wait_for(lambda: served._open == 0, 5, "the idle connections closed")
    assert httpx.get(f"http://127.0.0.1:{served.port}/metrics", timeout=5).status_code == 200


def test_the_endpoint_follows_the_loop_when_a_hook_blocks_it() -> None:
    """A hook that blocks the loop thread makes the watchdog start a new loop; the metrics (which show that) keep
    answering from the new one instead of going dark with the old."""
    runner = LoopThread()
    served = Endpoint("127.0.0.1:0", Meters(), runner, registry=CollectorRegistry(), read_timeout=0.3)
    served.start()
    release = threading.Event()
    try:
        blocked = runner.submit(release.wait, 10)
        runner.replace(blocked)
        answer = httpx.get(f"http://127.0.0.1:{served.port}/metrics", timeout=5)
        assert answer.status_code == 200
        assert samples(answer.text)["sidecar_inprocess_loops_replaced_total", ()] == 1
    finally:
        release.set()
        served.close()
    # Both loops turn again; closed, the port refuses.
    wait_for(lambda: _refused(served.port), 5, "the endpoint closed on both loops")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_an_address_in_use_is_bound_once_it_is_free_and_never_rejects_the_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The parent Envoy of a hot restart holds the port until it exits (and a running Envoy holds it while
    `envoy-config --validate` checks a new config): the filter config must not fail for it."""
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    waiting = Endpoint(f"127.0.0.1:{port}", Meters(), shared_loop(), registry=CollectorRegistry())
    try:
        assert waiting.start() == 0 and "is in use" in caplog.text
        holder.close()
        wait_for(lambda: waiting.port == port, 10, "the endpoint bound the freed port")
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
    finally:
        holder.close()
        waiting.close()


@pytest.mark.parametrize("address", ["192.0.2.1:9464"])  # TEST-NET: no interface here, no traffic
def test_an_address_that_cannot_be_bound_here_is_one_config_error(address: str) -> None:
    taken = Endpoint(address, Meters(), shared_loop(), registry=CollectorRegistry())
    with pytest.raises(ConfigError, match=rf"^metrics: cannot listen on {address}: ") as caught:
        taken.start()
    assert "\n" not in str(caught.value)


def test_configure_serves_once_per_process_and_a_second_address_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = free_port(), free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(f'metrics: "127.0.0.1:{first}"\nplugins:\n  - use: header-stamp\n')
    before = bridge._endpoint
    try:
        bridge._endpoint = None
        double = InProcessDouble(config)
        assert bridge._endpoint is not None and bridge._endpoint.port == first
        assert double.run(Request()).status == 200
        InProcessDouble(config)  # the same address again: still the one endpoint
        config.write_text(f'metrics: "127.0.0.1:{second}"\nplugins:\n  - use: header-stamp\n')
        InProcessDouble(config)
        assert bridge._endpoint.port == first and "is not" in caplog.text
        seen = samples(httpx.get(f"http://127.0.0.1:{first}/metrics", timeout=5).text)
        stamp = (("phase", "request_headers"), ("plugin", "header-stamp"))
        assert seen["sidecar_plugin_seconds_count", stamp] >= 1
    finally:
        if bridge._endpoint is not None and bridge._endpoint is not before:
            bridge._endpoint.close()
        bridge._endpoint = before


@pytest.mark.envoy
@pytest.mark.skipif(not sysconfig.get_config_var("Py_ENABLE_SHARED"), reason="this Python has no libpython.so")
def test_real_envoy_serves_the_per_plugin_counters(sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f'metrics: "127.0.0.1:{port}"\n'
        "chains:\n"
        f'  deny: {{plugins: ["{TP}DenyHeader"]}}\n'
        f'  closed: {{on_error: fail_closed, plugins: ["{TP}Raiser"]}}\n'
        f'  open: {{on_error: fail_open, plugins: ["{TP}Raiser"]}}\n'
    )
    env = sidecar_envoy(config=config, routes=["/deny/=deny", "/closed/=closed", "/open/=open"], in_process=True)
    with httpx.Client(base_url=env.url, timeout=10) as client:
        statuses = [
            client.get("/deny/a", headers={"x-deny": "1"}).status_code,
            client.get("/deny/b").status_code,
            client.get("/closed/a", headers={"x-boom": "1"}).status_code,
            client.get("/open/a", headers={"x-boom": "1"}).status_code,
        ]
    assert statuses == [403, 200, 500, 200]
    seen = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    headers = ("phase", "request_headers")
    responses = {labels: value for (name, labels), value in seen.items() if name == "sidecar_plugin_responses_total"}
    assert list(responses.values()) == [1] and ("status", "403") in next(iter(responses))
    errors = {labels: value for (name, labels), value in seen.items() if name == "sidecar_plugin_errors_total"}
    assert errors == {(headers, ("plugin", "raiser")): 2}  # one per chain's failure, whatever its policy
    counts = {
        labels: value
        for (name, labels), value in seen.items()
        if name == "sidecar_plugin_seconds_count" and headers in labels
    }
    assert counts == {(headers, ("plugin", "deny-header")): 2, (headers, ("plugin", "raiser")): 2}
    assert seen["sidecar_extproc_streams_total", (("chain", "deny"),)] == 2


class _HeldBody:
    """An upstream that sends its response headers and half the body, then holds the rest until `release`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with self._server:
            conn, _ = self._server.accept()
            with conn:
                conn.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    head += conn.recv(4096) or b"\r\n\r\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                self.release.wait(10)
                conn.sendall(b"cd")

    def close(self) -> None:
        self.release.set()
        self._thread.join(10)


@pytest.mark.envoy
@pytest.mark.skipif(not sysconfig.get_config_var("Py_ENABLE_SHARED"), reason="this Python has no libpython.so")
@pytest.mark.parametrize(("plugin", "open_while_body_flows"), [("AddHeaders", 0), ("Slow", 1)])
def test_a_headers_only_sync_stream_is_closed_at_its_last_hook(
    sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path, plugin: str, open_while_body_flows: int
) -> None:
    """A chain of sync headers hooks has nothing left to run once its response headers went on: the stream is
    closed then, under the GIL that hook holds (not by taking it again when Envoy destroys the filter), so it
    counts as closed while the body still flows. A chain with an async hook keeps its stream to the end."""
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(f'metrics: "127.0.0.1:{port}"\nchains:\n  default: {{plugins: ["{TP}{plugin}"]}}\n')
    upstream = _HeldBody()
    try:
        env = sidecar_envoy(config=config, upstream=("127.0.0.1", upstream.port), in_process=True)
        with httpx.Client(base_url=env.url, timeout=10) as client, client.stream("GET", "/held") as response:
            assert response.status_code == 200
            seen = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            assert seen["sidecar_extproc_streams_total", (("chain", "default"),)] == 1
            assert seen["sidecar_extproc_streams_active", ()] == open_while_body_flows
            upstream.release.set()
            assert response.read() == b"abcd"
        wait_for(
            lambda: (
                samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)[
                    "sidecar_extproc_streams_active", ()
                ]
                == 0
            ),
            timeout=10,
        )
    finally:
        upstream.close()
