"""The host-state budget: whatever a guest makes the host keep is charged, refused past the limit, refunded
when dropped; a refused call copies nothing; real modules run well inside the default."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from sidecar.wasm.host import Limits, LogLevel, Plugin, WasmCallError
from sidecar.wasm.host.errors import WasmHostLimitError
from sidecar.wasm.host.exchange import Request, Response, run_exchange
from tests.support import wat
from tests.support.wat import HAMMER_CALLOUT, HAMMER_FIXED_KEY, HAMMER_KEY, HAMMER_PAYLOAD, hammer

BUDGET = 1 << 20
CHUNK = 64 << 10
REQUEST = [(":path", "/"), (":method", "GET"), (":authority", "example.com")]
PAYLOAD = f"(i32.const {HAMMER_PAYLOAD}) (i32.const {CHUNK})"
EMPTY = "(i32.const 0) (i32.const 0)"
# proxy_set_header_map_pairs reads one pair "aaaa: a*CHUNK" laid out at the payload by this setup.
PAIRS_SETUP = f"""
    (i32.store (i32.const {HAMMER_PAYLOAD}) (i32.const 1))
    (i32.store (i32.const {HAMMER_PAYLOAD + 4}) (i32.const 4))
    (i32.store (i32.const {HAMMER_PAYLOAD + 8}) (i32.const {CHUNK}))
    (i32.store8 (i32.const {HAMMER_PAYLOAD + 16}) (i32.const 0))
    (i32.store8 (i32.const {HAMMER_PAYLOAD + 17 + CHUNK}) (i32.const 0))"""
PAIRS = f"(i32.const {HAMMER_PAYLOAD}) (i32.const {CHUNK + 18})"
QUEUE_SETUP = f"(drop (call $reg {HAMMER_FIXED_KEY} (i32.const 16)))"
QUEUE = "(i32.load (i32.const 16))"
STDOUT_SETUP = (
    f"(i32.store (i32.const 200) (i32.const {HAMMER_PAYLOAD})) (i32.store (i32.const 204) (i32.const {CHUNK}))"
)
HISTOGRAM_SETUP = f"(drop (call $defm (i32.const 2) {HAMMER_FIXED_KEY} (i32.const 16)))"


def callout(body: str) -> str:
    return f"(call $call {HAMMER_FIXED_KEY} {HAMMER_CALLOUT} {body} {EMPTY} (i32.const 1000) (i32.const 16))"


LOCAL_REPLY = f"(call $local (i32.const 500) {HAMMER_FIXED_KEY} {PAYLOAD} {EMPTY} (i32.const -1))"
APPEND_BODY = f"(call $setbuf (i32.const 0) (i32.const -1) (i32.const 0) {PAYLOAD})"
REPLACE_BODY = f"(call $setbuf (i32.const 0) (i32.const 0) (i32.const -1) {PAYLOAD})"

# Each grows host state without bound unless charged: (step, setup, payload, times, host function named).
GROWING = {
    "log": (f"(call $log (i32.const 2) {PAYLOAD})", "", CHUNK, 100, "proxy_log"),
    "stdout": (
        "(call $fdw (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208))",
        STDOUT_SETUP,
        CHUNK,
        100,
        "fd_write",
    ),
    "shared-data-values": (
        f"(call $sset {HAMMER_KEY} {PAYLOAD} (i32.const 0))",
        "",
        CHUNK,
        100,
        "proxy_set_shared_data",
    ),
    "shared-data-keys": (f"(call $sset {HAMMER_KEY} {EMPTY} (i32.const 0))", "", 0, 100_000, "proxy_set_shared_data"),
    "queue-items": (f"(call $enq {QUEUE} {PAYLOAD})", QUEUE_SETUP, CHUNK, 100, "proxy_enqueue_shared_queue"),
    "empty-queue-items": (f"(call $enq {QUEUE} {EMPTY})", QUEUE_SETUP, 0, 100_000, "proxy_enqueue_shared_queue"),
    "queue-names": (f"(call $reg {HAMMER_KEY} (i32.const 16))", "", 0, 100_000, "proxy_register_shared_queue"),
    "body": (APPEND_BODY, "", CHUNK, 100, "proxy_set_buffer_bytes"),
    "header-values": (
        f"(call $add (i32.const 0) {HAMMER_FIXED_KEY} {PAYLOAD})",
        "",
        CHUNK,
        100,
        "proxy_add_header_map_value",
    ),
    "header-count": (f"(call $add (i32.const 0) {HAMMER_KEY} {EMPTY})", "", 0, 100_000, "proxy_add_header_map_value"),
    "header-names": (
        f"(call $replace (i32.const 0) {HAMMER_KEY} {EMPTY})",
        "",
        0,
        100_000,
        "proxy_replace_header_map_value",
    ),
    "metric-names": (f"(call $defm (i32.const 0) {HAMMER_KEY} (i32.const 16))", "", 0, 100_000, "proxy_define_metric"),
    # One name defined again and again: each definition is a new id, as in Envoy, and each id is kept.
    "metric-redefinitions": (
        f"(call $defm (i32.const 0) {HAMMER_FIXED_KEY} (i32.const 16))",
        "",
        0,
        100_000,
        "proxy_define_metric",
    ),
    "histogram-samples": (f"(call $recm {QUEUE} (i64.const 7))", HISTOGRAM_SETUP, 0, 100_000, "proxy_record_metric"),
    "properties": (f"(call $setprop {HAMMER_KEY} {PAYLOAD})", "", CHUNK, 100, "proxy_set_property"),
    "property-paths": (f"(call $setprop {HAMMER_KEY} {EMPTY})", "", 0, 100_000, "proxy_set_property"),
    "callouts": (callout(PAYLOAD), "", CHUNK, 100, "proxy_http_call"),
    "empty-callouts": (callout(EMPTY), "", 0, 100_000, "proxy_http_call"),
}


def _plugin(source: str, tmp_path: Path, budget: int = BUDGET) -> Plugin:
    # A generous call deadline: what is tested is the budget, and some hammers (thousands of header names,
    # each replace a scan of the map, as in Envoy) take seconds under coverage on a shared machine.
    limits = Limits(host_state_bytes=budget, call_timeout_s=60)
    return Plugin(source, name="hammer", cache=tmp_path, limits=limits).start()


@pytest.mark.parametrize("kind", sorted(GROWING))
def test_every_kind_of_host_state_is_bounded(kind: str, tmp_path: Path) -> None:
    step, setup, payload, times, function = GROWING[kind]
    plugin = _plugin(hammer(step, times, payload=payload, setup=setup), tmp_path)
    http = plugin.http_context()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with pytest.raises(WasmHostLimitError) as info:
            http.on_request_headers(REQUEST)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    error = info.value
    assert isinstance(error, WasmCallError) and error.callback == "proxy_on_request_headers"
    assert f"host-state budget of {BUDGET} bytes (Limits.host_state_bytes)" in str(error)
    assert function in str(error)
    assert plugin.failed and plugin.host_state_bytes <= BUDGET
    # The charges track what CPython really holds: the guest cannot make the host keep much more than
    # the budget by choosing small or empty entries.
    assert kept < 1.5 * BUDGET, f"{kind}: the host kept {kept} bytes under a {BUDGET}-byte budget"


@pytest.mark.parametrize(
    ("kind", "step", "setup"),
    [
        ("log", f"(call $log (i32.const 2) {PAYLOAD})", ""),
        ("shared-data", f"(call $sset {HAMMER_FIXED_KEY} {PAYLOAD} (i32.const 0))", ""),
        ("queue", f"(call $enq {QUEUE} {PAYLOAD})", QUEUE_SETUP),
        ("body", APPEND_BODY, ""),
        ("header-pairs", f"(call $setpairs (i32.const 0) {PAIRS})", PAIRS_SETUP),
        ("property", f"(call $setprop {HAMMER_FIXED_KEY} {PAYLOAD})", ""),
        ("local-reply", LOCAL_REPLY, ""),
        ("callout", callout(PAYLOAD), ""),
    ],
)
def test_one_oversized_call_is_refused_before_the_host_copies_it(
    kind: str, step: str, setup: str, tmp_path: Path
) -> None:
    small = CHUNK // 2  # a budget smaller than one payload
    plugin = _plugin(hammer(step, 1, payload=CHUNK, setup=setup), tmp_path, budget=small)
    with pytest.raises(WasmHostLimitError, match=f"budget of {small} bytes"):
        plugin.http_context().on_request_headers(REQUEST)
    assert plugin.host_state_bytes <= small


@pytest.mark.parametrize(
    ("kind", "step", "setup"),
    [
        ("shared-data-replaced", f"(call $sset {HAMMER_FIXED_KEY} {PAYLOAD} (i32.const 0))", ""),
        ("body-replaced", REPLACE_BODY, ""),
        ("header-replaced", f"(call $replace (i32.const 0) {HAMMER_FIXED_KEY} {PAYLOAD})", ""),
        ("header-pairs-replaced", f"(call $setpairs (i32.const 0) {PAIRS})", PAIRS_SETUP),
        ("property-replaced", f"(call $setprop {HAMMER_FIXED_KEY} {PAYLOAD})", ""),
        ("local-reply-replaced", LOCAL_REPLY, ""),
        (
            "queue-drained",
            f"(drop (call $enq {QUEUE} {PAYLOAD})) (call $deq {QUEUE} (i32.const 20) (i32.const 24))",
            QUEUE_SETUP,
        ),
        ("log-below-level", f"(call $log (i32.const 0) {PAYLOAD})", ""),
    ],
)
def test_replaced_or_dropped_state_is_refunded(kind: str, step: str, setup: str, tmp_path: Path) -> None:
    # 200 x 64 KiB = 12.5 MiB of calls under a 1 MiB budget: fine, because each replaces the last.
    source = hammer(step, 200, payload=CHUNK, setup=setup)
    plugin = Plugin(
        source,
        name="hammer",
        cache=tmp_path,
        limits=Limits(host_state_bytes=BUDGET),
        log_level=LogLevel.INFO,
    ).start()
    http = plugin.http_context()
    http.on_request_headers(REQUEST)
    assert plugin.failed is None
    assert plugin.host_state_bytes < 2 * CHUNK + (16 << 10)


def test_a_finished_stream_and_an_answered_callout_are_refunded(tmp_path: Path) -> None:
    add = f"(call $add (i32.const 0) {HAMMER_KEY} {PAYLOAD})"
    plugin = _plugin(hammer(f"(drop {add}) {callout(PAYLOAD)}", 4, payload=CHUNK), tmp_path)
    for _ in range(10):  # 10 streams x 8 x 64 KiB: more than the budget, fine once each is finished
        http = plugin.http_context()
        http.on_request_headers(REQUEST)
        assert plugin.host_state_bytes > 8 * CHUNK
        for call in plugin.http_calls:
            plugin.respond_http_call(call, None)
        http.finish()
        assert plugin.host_state_bytes == 0
    assert plugin.failed is None


def test_clear_logs_refunds_them(tmp_path: Path) -> None:
    plugin = _plugin(hammer(f"(call $log (i32.const 2) {PAYLOAD})", 10, payload=CHUNK), tmp_path)
    for _ in range(5):  # 5 x 640 KiB of logs under a 1 MiB budget
        http = plugin.http_context()
        http.on_request_headers(REQUEST)
        http.finish()
        assert len(plugin.logs()) == 10
        plugin.clear_logs()
        assert plugin.host_state_bytes == 0


def test_wasi_random_get_and_fd_write_refuse_sizes_they_cannot_serve(tmp_path: Path) -> None:
    # 2 GiB of randomness or 100k write vectors must be refused before the host builds them.
    step = (
        "(i32.store (i32.const 24) (call $rand (i32.const 0) (i32.const 0x7fffffff)))"
        " (call $fdw (i32.const 1) (i32.const 0) (i32.const 100000) (i32.const 208))"
    )
    plugin = _plugin(hammer(step, 1), tmp_path)
    tracemalloc.start()
    try:
        plugin.http_context().on_request_headers(REQUEST)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert plugin.failed is None
    memory = plugin.instance.exports["memory"]
    store = plugin.instance.store
    read = bytes(memory.read(store, 24, 28)) + bytes(memory.read(store, 92, 96))
    assert read == (21).to_bytes(4, "little") + (28).to_bytes(4, "little")  # EFAULT, EINVAL
    assert peak < 4 << 20


def test_default_budget_is_generous(tmp_path: Path) -> None:
    assert Limits().host_state_bytes == 32 << 20
    # 16 MiB of shared data in 256 entries fits the default, as a real filter's cache would.
    source = hammer(f"(call $sset {HAMMER_KEY} {PAYLOAD} (i32.const 0))", 256, payload=CHUNK)
    plugin = Plugin(source, name="cache", cache=tmp_path).start()
    plugin.http_context().on_request_headers(REQUEST)
    assert plugin.failed is None and len(plugin.shared_data) == 256


@pytest.mark.parametrize("name", ["gcore_conformance", "solo_conformance"])
def test_real_modules_run_well_inside_the_default_budget(
    name: str, sdk_modules: dict[str, Path], shared_cache: Path
) -> None:
    plugin = Plugin(sdk_modules[name], root_id="fixture", configuration="tag-budget", cache=shared_cache).start()
    body = b"secret " * 20000
    for _ in range(20):
        exchange = run_exchange(
            plugin,
            Request("POST", "/u", [("x-rewrite", "1")], body),
            lambda req: Response(200, [("x-echo", "1")], req.body),
            chunk_size=16384,
        )
        assert exchange.response is not None and exchange.response.status == 200
        assert exchange.upstream_request is not None and b"secret" not in exchange.upstream_request.body
    assert plugin.failed is None
    assert plugin.host_state_bytes < 1 << 20


def test_modules_from_the_wat_suite_still_run(tmp_path: Path) -> None:
    plugin = Plugin(wat.ROOT_FEATURES, name="root", cache=tmp_path, environment={"A": "1"}).start()
    for _ in range(3):
        plugin.tick()
    assert plugin.shared_data[b"last"] == b"tick"
