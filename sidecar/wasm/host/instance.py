"""One instantiated module: the wasmtime store and instance, host state, and guarded calls into it.

`Instance` is the `HostState` the host functions (imports.py, wasi.py) read and write; it links them
into the module when it is created.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from sidecar.wasm.host.abi import AbiVersion, LogLevel, detect_abi
from sidecar.wasm.host.binding import link
from sidecar.wasm.host.errors import (
    HostBudgetExceeded,
    ProcExit,
    WasmAbiError,
    WasmCallError,
    WasmHostLimitError,
    WasmLoadError,
    WasmMemoryLimitError,
    WasmStateError,
    WasmTimeoutError,
)
from sidecar.wasm.host.imports import Env
from sidecar.wasm.host.memory import GuestMemory
from sidecar.wasm.host.properties import Properties, PropertyValue
from sidecar.wasm.host.state import (
    HostBudget,
    HttpCall,
    HttpCallResponse,
    LogRecord,
    Metric,
    SharedState,
    StreamState,
    held,
)
from sidecar.wasm.host.vm import Limits, compile_module, engine_for, ticks_for
from sidecar.wasm.host.wasi import Wasi

__all__ = ["Instance", "InstanceOptions"]


@dataclass(frozen=True)
class InstanceOptions:
    plugin_configuration: bytes
    vm_configuration: bytes
    properties: Mapping[str, PropertyValue]
    environment: Mapping[str, str]
    limits: Limits
    cache: Path | None
    log_level: LogLevel
    clusters: frozenset[str] | None
    seed: int | None
    vm_id: str = ""


class Instance:
    """Host state plus the instance; a `HostState` for the host functions."""

    def __init__(self, source: bytes | str, module_name: str, options: InstanceOptions) -> None:
        self.module_name = module_name
        self.options = options
        self.engine = engine_for(options.limits)
        self.module = compile_module(self.engine, source, module_name, cache=options.cache)
        exports = {e.name: e for e in self.module.exports}
        self.abi: AbiVersion = detect_abi(exports)
        if "memory" not in exports:
            raise WasmAbiError(f"{module_name}: module does not export its memory")
        # Envoy's host looks for malloc before proxy_on_memory_allocate (cpp-host src/wasm.cc).
        alloc_name = next((n for n in ("malloc", "proxy_on_memory_allocate") if n in exports), None)
        if alloc_name is None:
            raise WasmAbiError(f"{module_name}: module exports neither malloc nor proxy_on_memory_allocate")

        self.plugin_configuration = options.plugin_configuration
        self.budget = HostBudget(options.limits.host_state_bytes)
        self.logs: list[LogRecord] = []
        self.log_level = options.log_level
        self.properties = Properties(options.properties)
        self.streams: dict[int, StreamState] = {}
        self.metrics: dict[int, Metric] = {}
        self.metric_ids: dict[tuple[int, str], int] = {}
        self.histograms: dict[str, list[int]] = {}
        self.shared = SharedState()
        self.http_calls: dict[int, HttpCall] = {}
        self.next_token = 1
        self.tick_period_ms = 0
        self.queue_ready: list[tuple[int, int]] = []
        self.call_response: HttpCallResponse | None = None
        self.status: tuple[int, bytes] = (0, b"")
        self.root_context_id = 1
        self.next_context_id = 2
        self.active_context = 0
        self.current_callback = ""
        self.random = random.Random(options.seed) if options.seed is not None else random.SystemRandom()
        self.failed: str | None = None

        self.store = wasmtime.Store(self.engine)
        self.store.set_limits(memory_size=options.limits.memory_bytes)
        linker = wasmtime.Linker(self.engine)
        wasi = Wasi(self)
        # Envoy registers WASI under both names (cpp-host src/wasm.cc).
        providers = {"env": Env(self), "wasi_snapshot_preview1": wasi, "wasi_unstable": wasi}
        link(linker, self.module, module_name, providers, self.abi)
        self.store.set_epoch_deadline(ticks_for(options.limits.call_timeout_s))
        try:
            instance = linker.instantiate(self.store, self.module)
        except (wasmtime.Trap, ProcExit, HostBudgetExceeded) as trap:  # a start function runs host calls too
            raise self._call_error("instantiation", trap) from None
        except wasmtime.WasmtimeError as exc:
            text = _first_line(exc)
            if "memory" in text and "limit" in text:
                raise WasmMemoryLimitError(module_name, "instantiation", text) from None
            raise WasmLoadError(f"{module_name}: cannot instantiate: {text}") from None
        self.exports: dict[str, Any] = dict(instance.exports(self.store).items())
        self._arity: dict[str, int] = {}
        self.memory = GuestMemory(self.exports["memory"], self.exports[alloc_name])

    # -- calls into the guest -------------------------------------------------------------------

    def has(self, export: str) -> bool:
        return export in self.exports

    def arity(self, export: str) -> int:
        if export not in self._arity:
            self._arity[export] = len(self.exports[export].type(self.store).params)
        return self._arity[export]

    def call(self, export: str, *args: int) -> int | None:
        """Call an export under the deadline; None if it is not exported (callbacks are optional)."""
        if self.failed is not None:
            raise WasmStateError(f"{self.module_name}: the VM failed earlier ({self.failed}); create a new Plugin")
        func = self.exports.get(export)
        if func is None:
            return None
        self.store.set_epoch_deadline(ticks_for(self.options.limits.call_timeout_s))
        outer, self.current_callback = self.current_callback, export
        try:
            result = func(self.store, *args)
        except (wasmtime.Trap, wasmtime.WasmtimeError, ProcExit, HostBudgetExceeded) as exc:
            error = self._call_error(export, exc)
            self.failed = error.reason
            raise error from None
        except Exception as exc:  # a bug in a host function must not take the test process down
            self.failed = f"host function raised {type(exc).__name__}: {exc}"
            raise WasmCallError(self.module_name, export, self.failed) from exc
        finally:
            self.current_callback = outer
            self._deliver_queue_ready(export)
        return int(result) if isinstance(result, int) else None

    def _deliver_queue_ready(self, export: str) -> None:
        # Envoy posts on_queue_ready to the dispatcher: it runs after the enqueuing callback returns.
        while self.queue_ready and self.failed is None and export != "proxy_on_queue_ready":
            context_id, queue_id = self.queue_ready.pop(0)
            self.active_context = context_id
            self.call("proxy_on_queue_ready", context_id, queue_id)

    def _call_error(self, callback: str, exc: BaseException) -> WasmCallError:
        limits = self.options.limits
        if isinstance(exc, HostBudgetExceeded):
            return WasmHostLimitError(self.module_name, callback, str(exc))
        code = getattr(exc, "trap_code", None)
        if code == wasmtime.TrapCode.INTERRUPT:
            reason = f"deadline of {limits.call_timeout_s:g}s exceeded"
            return WasmTimeoutError(self.module_name, callback, reason)
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            reason = f"stack overflow (max stack {limits.max_stack_bytes} bytes)"
            return WasmCallError(self.module_name, callback, reason)
        if isinstance(exc, ProcExit):
            last = next((r.message for r in reversed(self.logs) if r.level >= LogLevel.ERROR), "")
            reason = f"module called proc_exit({exc.code})" + (f" after logging {last!r}" if last else "")
        else:
            reason = f"trap: {_trap_text(exc)}"
        # wasmtime-py has no limiter callback: a failure with memory grown to near the cap is the
        # signature of a refused memory.grow (runtimes then trap or abort through proc_exit).
        memory = self.exports.get("memory") if hasattr(self, "exports") else None
        if memory is not None and memory.data_len(self.store) + (1 << 20) >= limits.memory_bytes:
            reason = f"memory limit of {limits.memory_bytes} bytes reached ({reason})"
            return WasmMemoryLimitError(self.module_name, callback, reason)
        return WasmCallError(self.module_name, callback, reason)

    # -- helpers for host functions -------------------------------------------------------------

    @property
    def vm_configuration(self) -> bytes:
        return self.options.vm_configuration

    @property
    def environment(self) -> Mapping[str, str]:
        return self.options.environment

    @property
    def clusters(self) -> frozenset[str] | None:
        return self.options.clusters

    @property
    def vm_id(self) -> str:
        return self.options.vm_id

    def stream(self) -> StreamState | None:
        return self.streams.get(self.active_context)

    def log(self, level: LogLevel, message: str) -> None:
        self.budget.charge(held(message), f"a log record of {len(message)} characters")
        self.logs.append(LogRecord(level, message, self.active_context))

    def new_context_id(self) -> int:
        cid = self.next_context_id
        self.next_context_id += 1
        return cid


def _trap_text(exc: BaseException) -> str:
    """wasmtime puts the backtrace first and the cause ("wasm trap: ...") last."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
