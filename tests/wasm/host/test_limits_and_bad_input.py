"""Bad modules, traps and limits: always a clear WasmError naming module, callback and reason."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import wasmtime

from sidecar.stack.envoy import Envoy, EnvoyError
from sidecar.wasm.host import (
    Limits,
    LogLevel,
    Plugin,
    Status,
    WasmAbiError,
    WasmCallError,
    WasmLoadError,
    WasmMemoryLimitError,
    WasmStateError,
    WasmTimeoutError,
)
from tests.support import wat
from tests.support.wasm_host import bootstrap, echo_server, send

REQUEST = [(":path", "/"), (":method", "GET"), (":authority", "example.com")]


def _plugin(source: str, tmp_path: Path, **kwargs: object) -> Plugin:
    return Plugin(source, name="probe", cache=tmp_path, **kwargs).start()  # type: ignore[arg-type]


def test_not_a_wasm_file(tmp_path: Path) -> None:
    bogus = tmp_path / "filter.wasm"
    bogus.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(WasmLoadError, match=r"filter\.wasm: not a WebAssembly module"):
        Plugin(bogus)
    with pytest.raises(WasmLoadError, match="no such file"):
        Plugin(tmp_path / "missing.wasm")


def test_truncated_wasm_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.wasm"
    broken.write_bytes(wasmtime.wat2wasm(wat.TRAP)[:40])
    with pytest.raises(WasmLoadError, match=r"broken\.wasm: cannot compile"):
        Plugin(broken, cache=tmp_path / "c")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (wat.NO_MARKER, "no proxy_abi_version_"),
        (wat.UNKNOWN_MARKER, "unknown proxy-wasm ABI version '0_3_0'"),
        (wat.NO_MEMORY, "does not export its memory"),
        (wat.NO_ALLOCATOR, "neither malloc nor proxy_on_memory_allocate"),
    ],
)
def test_abi_problems(source: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(WasmAbiError, match=message):
        Plugin(source, cache=tmp_path)


@pytest.mark.envoy
@pytest.mark.parametrize("source", [wat.NO_MARKER, wat.UNKNOWN_MARKER], ids=["no-marker", "unknown-marker"])
def test_envoy_also_refuses_modules_without_a_known_abi(source: str, tmp_path: Path) -> None:
    module = tmp_path / "bad-abi.wasm"
    module.write_bytes(wasmtime.wat2wasm(source))
    with pytest.raises(WasmAbiError):
        Plugin(module, cache=tmp_path / "c")
    with echo_server() as echo:
        envoy = Envoy(bootstrap(module, root_id="", configuration="", upstream_port=echo.port))
        try:
            with pytest.raises(EnvoyError):
                envoy.start(timeout=20)
            assert "Missing or unknown Proxy-Wasm ABI version" in envoy.logs()
        finally:
            envoy.close()


def test_grpc_calls_are_unimplemented(tmp_path: Path) -> None:
    http = _plugin(wat.GRPC_CALL, tmp_path).http_context()
    http.on_request_headers(REQUEST)
    assert [v for k, v in http.request_headers if k == "x-grpc"] == ["-", chr(65 + Status.UNIMPLEMENTED)]


def test_unknown_import(tmp_path: Path) -> None:
    with pytest.raises(WasmLoadError, match=r"import env.proxy_make_coffee is not provided"):
        Plugin(wat.UNKNOWN_IMPORT, cache=tmp_path)


def test_trap_is_reported_and_vm_marked_failed(tmp_path: Path) -> None:
    plugin = _plugin(wat.TRAP, tmp_path)
    http = plugin.http_context()
    with pytest.raises(WasmCallError) as info:
        http.on_request_headers(REQUEST)
    assert info.value.module == "probe"
    assert info.value.callback == "proxy_on_request_headers"
    assert "unreachable" in info.value.reason
    assert plugin.failed
    with pytest.raises(WasmStateError, match="failed earlier"):
        plugin.http_context().on_request_headers(REQUEST)


def test_infinite_loop_hits_deadline(tmp_path: Path) -> None:
    plugin = _plugin(wat.INFINITE_LOOP, tmp_path, limits=Limits(call_timeout_s=0.2))
    started = time.monotonic()
    with pytest.raises(WasmTimeoutError, match=r"probe: proxy_on_request_headers failed: deadline of 0.2s exceeded"):
        plugin.http_context().on_request_headers(REQUEST)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("source", [wat.MEMORY_BOMB, wat.MEMORY_BOMB_EXIT], ids=["trap", "proc-exit"])
def test_memory_bomb_hits_limit(source: str, tmp_path: Path) -> None:
    plugin = _plugin(source, tmp_path, limits=Limits(memory_bytes=16 << 20))
    with pytest.raises(WasmMemoryLimitError, match="memory limit of 16777216 bytes"):
        plugin.http_context().on_request_headers(REQUEST)


def test_initial_memory_over_limit(tmp_path: Path) -> None:
    with pytest.raises(WasmMemoryLimitError, match="instantiation"):
        Plugin(wat.HUGE_INITIAL_MEMORY, cache=tmp_path, limits=Limits(memory_bytes=8 << 20))


def test_stack_overflow(tmp_path: Path) -> None:
    plugin = _plugin(wat.STACK_OVERFLOW, tmp_path, limits=Limits(max_stack_bytes=256 << 10))
    with pytest.raises(WasmCallError, match="stack overflow"):
        plugin.http_context().on_request_headers(REQUEST)


def test_proc_exit_is_a_failure(tmp_path: Path) -> None:
    plugin = _plugin(wat.PROC_EXIT, tmp_path)
    with pytest.raises(WasmCallError, match=r"proc_exit\(3\)"):
        plugin.http_context().on_request_headers(REQUEST)


@pytest.mark.envoy
def test_rejected_configuration_matches_envoy(sdk_modules: dict[str, Path], tmp_path: Path) -> None:
    module = sdk_modules["gcore_conformance"]
    with pytest.raises(WasmCallError, match="proxy_on_configure failed: the module rejected its plugin configuration"):
        Plugin(module, root_id="fixture", configuration="reject", cache=tmp_path).start()
    with echo_server() as echo:
        envoy = Envoy(bootstrap(module, root_id="fixture", configuration="reject", upstream_port=echo.port))
        try:
            with pytest.raises(EnvoyError):
                envoy.start(timeout=20)
        finally:
            envoy.close()


@pytest.mark.envoy
def test_empty_configuration_traps_solo_sdk_as_in_envoy(sdk_modules: dict[str, Path], tmp_path: Path) -> None:
    """Both hosts hand an empty buffer over as (ptr 0, size 0); that SDK then reads out of bounds."""
    module = sdk_modules["solo_conformance"]
    with pytest.raises(WasmCallError, match=r"proxy_on_configure failed: .*out of bounds memory access"):
        Plugin(module, root_id="fixture", configuration="", cache=tmp_path).start()
    with echo_server() as echo:
        envoy = Envoy(bootstrap(module, root_id="fixture", configuration="", upstream_port=echo.port))
        try:
            with pytest.raises(EnvoyError):
                envoy.start(timeout=20)
            assert "proxy_on_configure failed: Uncaught RuntimeError: memory access out of bounds" in envoy.logs()
        finally:
            envoy.close()


@pytest.mark.envoy
@pytest.mark.parametrize("source", [wat.PROBE_0_2, wat.PROBE_0_1], ids=["abi-0.2.0", "abi-0.1.0"])
def test_status_codes_match_envoy(source: str, tmp_path: Path) -> None:
    """Out-of-bounds pointers, missing keys, bad arguments: the same proxy_status_t as Envoy's host."""
    module = tmp_path / "probe.wasm"
    module.write_bytes(wasmtime.wat2wasm(source))
    with echo_server() as echo:
        with Envoy(bootstrap(module, root_id="", configuration="", upstream_port=echo.port)) as envoy:
            send(envoy, "GET", "/", [("host", "example.com")], b"")
        envoy_view = sorted((k, v) for k, v in echo.seen[0].headers if k.startswith("x-s"))
    plugin = Plugin(module, cache=tmp_path / "c", clusters=["echo"]).start()
    http = plugin.http_context()
    http.on_request_headers(REQUEST, end_of_stream=True)
    host_view = sorted((k, v) for k, v in http.request_headers if k.startswith("x-s"))
    assert len(envoy_view) == 24
    assert host_view == envoy_view


@pytest.mark.envoy
def test_vm_configuration_and_environment_match_envoy(tmp_path: Path) -> None:
    module = tmp_path / "vm-start.wasm"
    module.write_bytes(wasmtime.wat2wasm(wat.VM_START_REPORT))
    env = {"MODE": "test", "REGION": "eu-1"}
    boot = bootstrap(module, root_id="", configuration="", upstream_port=1)
    vm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    vm_config = vm["typed_config"]["config"]["vm_config"]
    vm_config["configuration"] = {
        "@type": "type.googleapis.com/google.protobuf.StringValue",
        "value": "vm-cfg-1",
    }
    vm_config["environment_variables"] = {"key_values": env}
    with Envoy(boot) as envoy:
        envoy_lines = [line.rsplit(": ", 1)[-1] for line in envoy.logs().splitlines() if "wasm log" in line]
    plugin = Plugin(module, vm_configuration="vm-cfg-1", environment=env, cache=tmp_path / "c").start()
    assert envoy_lines[:1] == ["vm-cfg-1"]
    # Envoy does not promise an order for the environment; compare as sets.
    assert sorted(plugin.logs(LogLevel.WARN)[1].rstrip(";").split(";")) == sorted(envoy_lines[1].rstrip(";").split(";"))
    assert plugin.logs(LogLevel.WARN)[0] == envoy_lines[0]
