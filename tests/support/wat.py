"""Hand-written WAT modules for edge cases: bad modules, traps, limits, and status-code probes."""

from __future__ import annotations

# A bump allocator and the root-context callbacks every good module below shares.
_BASE = """
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    global.get $heap local.set $p
    global.get $heap local.get $n i32.add global.set $heap
    local.get $p)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
  (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)
"""


def module(body: str, *, marker: str = "0_2_1", base: bool = True, imports: str = "") -> str:
    marker_export = f'(func (export "proxy_abi_version_{marker}"))' if marker else ""
    return f"(module {imports} {_BASE if base else ''} {marker_export} {body})"


def headers_callback(body: str) -> str:
    return f'(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {body})'


NO_MARKER = module("", marker="")
UNKNOWN_MARKER = module("", marker="0_3_0")
NO_MEMORY = """(module (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) i32.const 0))"""
NO_ALLOCATOR = '(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_0")))'
UNKNOWN_IMPORT = module("", imports='(import "env" "proxy_make_coffee" (func (param i32) (result i32)))')
TRAP = module(headers_callback("unreachable"))
INFINITE_LOOP = module(headers_callback("(loop $spin (br $spin)) i32.const 0"))
# Grows 16 pages at a time until memory.grow fails, then traps: what a runaway allocator does.
MEMORY_BOMB = module(
    headers_callback("""
    (block $done (loop $grow
      (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
      (br $grow)))
    unreachable""")
)
MEMORY_BOMB_EXIT = module(
    headers_callback("""
    (block $done (loop $grow
      (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
      (br $grow)))
    (call $exit (i32.const 255))
    i32.const 0"""),
    imports='(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))',
)
HUGE_INITIAL_MEMORY = (
    '(module (memory (export "memory") 1000) (func (export "proxy_abi_version_0_2_1"))'
    ' (func (export "malloc") (param i32) (result i32) i32.const 0))'
)
STACK_OVERFLOW = module(
    "(func $down (param i32) (result i32) (call $down (i32.add (local.get 0) (i32.const 1))))"
    + headers_callback("(call $down (i32.const 0))")
)
CONFIG_REJECTED = """(module
  (memory (export "memory") 1)
  (func (export "malloc") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 0))"""
PROC_EXIT = module(
    headers_callback("(call $exit (i32.const 3)) i32.const 0"),
    imports='(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))',
)

_PROBE_IMPORTS = """
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $sget (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $sset (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $defm (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $incm (param i32 i64) (result i32)))
  (import "env" "proxy_set_effective_context" (func $eff (param i32) (result i32)))
  (import "env" "proxy_record_metric" (func $recm (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $getm (param i32 i32) (result i32)))
"""

# Each probe stores the status of one host call as request header `x-sN: <'A' + status>`.
_PROBES = """
  (data (i32.const 100) "x-missing")
  (data (i32.const 120) "nope")
  (data (i32.const 130) "echo")
  (data (i32.const 140) "x-s0")
  (data (i32.const 150) "cnt")
  (data (i32.const 160) "gauge")
  (data (i32.const 170) "histo")
  (func $report (param $i i32) (param $status i32)
    (i32.store8 (i32.const 143) (i32.add (i32.const 64) (local.get $i)))
    (i32.store8 (i32.const 200) (i32.add (i32.const 65) (local.get $status)))
    (drop (call $add (i32.const 0) (i32.const 140) (i32.const 4) (i32.const 200) (i32.const 1))))
  (func $probe (param $ctx i32)
    (call $report (i32.const 1) (call $log (i32.const 2) (i32.const 0xFFFFFFF0) (i32.const 64)))
    (call $report (i32.const 2) (call $get (i32.const 0) (i32.const 100) (i32.const 9)
      (i32.const 300) (i32.const 304)))
    (call $report (i32.const 3) (call $prop (i32.const 120) (i32.const 4) (i32.const 300) (i32.const 304)))
    (call $report (i32.const 4) (call $get (i32.const 0) (i32.const 0x7FFFFFF0)
      (i32.const 9) (i32.const 300) (i32.const 304)))
    (call $report (i32.const 5) (call $call (i32.const 130) (i32.const 4) (i32.const 0)
      (i32.const 0) (i32.const 0)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 308)))
    (call $report (i32.const 6) (call $sget (i32.const 120) (i32.const 4) (i32.const 300)
      (i32.const 304) (i32.const 312)))
    (call $report (i32.const 7) (call $deq (i32.const 999) (i32.const 300) (i32.const 304)))
    (call $report (i32.const 8) (call $defm (i32.const 7) (i32.const 150) (i32.const 3) (i32.const 316)))
    (call $report (i32.const 9) (call $incm (i32.const 123456) (i64.const 1)))
    (call $report (i32.const 10) (call $sset (i32.const 120) (i32.const 4)
      (i32.const 150) (i32.const 3) (i32.const 77)))
    (call $report (i32.const 11) (call $eff (i32.const 4242)))
    (call $report (i32.const 12) (call $eff (local.get $ctx)))
    (call $report (i32.const 13) (call $log (i32.const 9) (i32.const 120) (i32.const 4)))
    ;; metrics: a gauge recorded then decremented, a histogram, a counter asked to go down
    (call $report (i32.const 14) (call $defm (i32.const 1) (i32.const 160) (i32.const 5) (i32.const 320)))
    (call $report (i32.const 15) (call $recm (i32.load (i32.const 320)) (i64.const 5)))
    (call $report (i32.const 16) (call $incm (i32.load (i32.const 320)) (i64.const -2)))
    (call $report (i32.const 17) (call $getm (i32.load (i32.const 320)) (i32.const 328)))
    (call $report (i32.const 18) (i32.load (i32.const 328)))
    (call $report (i32.const 19) (call $defm (i32.const 2) (i32.const 170) (i32.const 5) (i32.const 336)))
    (call $report (i32.const 20) (call $recm (i32.load (i32.const 336)) (i64.const 7)))
    (call $report (i32.const 21) (call $getm (i32.load (i32.const 336)) (i32.const 328)))
    (call $report (i32.const 22) (call $incm (i32.load (i32.const 336)) (i64.const 1)))
    (call $report (i32.const 23) (call $defm (i32.const 0) (i32.const 150) (i32.const 3) (i32.const 340)))
    (call $report (i32.const 24) (call $incm (i32.load (i32.const 340)) (i64.const -1))))
"""

PROBE_0_2 = module(
    _PROBES + headers_callback("(call $probe (local.get 0)) i32.const 0"),
    marker="0_2_0",
    imports=_PROBE_IMPORTS,
)
PROBE_0_1 = module(
    _PROBES
    + '(func (export "proxy_on_request_headers") (param i32 i32) (result i32)'
    + " (call $probe (local.get 0)) i32.const 0)",
    marker="0_1_0",
    imports=_PROBE_IMPORTS,
)

# Root-context features: tick period, a shared queue fed on tick and drained on queue-ready into
# shared data, and the WASI environment logged at VM start.
ROOT_FEATURES = """(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $reg (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $sset (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $envsizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (data (i32.const 100) "q")
  (data (i32.const 110) "tick")
  (data (i32.const 120) "last")
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    global.get $heap local.set $p
    global.get $heap local.get $n i32.add global.set $heap
    local.get $p)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $envsizes (i32.const 0) (i32.const 4)))
    (drop (call $environ (i32.const 16) (i32.const 1024)))
    (drop (call $log (i32.const 2) (i32.const 1024) (i32.load (i32.const 4))))
    i32.const 1)
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 50)))
    (drop (call $reg (i32.const 100) (i32.const 1) (i32.const 500)))
    i32.const 1)
  (func (export "proxy_on_tick") (param i32)
    (drop (call $enq (i32.load (i32.const 500)) (i32.const 110) (i32.const 4))))
  (func (export "proxy_on_queue_ready") (param i32 i32)
    (drop (call $deq (local.get 1) (i32.const 504) (i32.const 508)))
    (drop (call $sset (i32.const 120) (i32.const 4) (i32.load (i32.const 504)) (i32.load (i32.const 508))
      (i32.const 0)))))
"""

GRPC_CALL = module(
    headers_callback("""
    (call $add (i32.const 0) (i32.const 140) (i32.const 6) (i32.const 200) (i32.const 1))
    drop
    (i32.store8 (i32.const 200) (i32.add (i32.const 65)
      (call $grpc (i32.const 130) (i32.const 4) (i32.const 130) (i32.const 4) (i32.const 130) (i32.const 4)
        (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 300))))
    (call $add (i32.const 0) (i32.const 140) (i32.const 6) (i32.const 200) (i32.const 1))
    drop
    i32.const 0""")
    + '(data (i32.const 130) "echo") (data (i32.const 140) "x-grpc") (data (i32.const 200) "-")',
    imports="""
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call" (func $grpc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32)
    (result i32)))""",
)

# Logs (at WARN) the VM configuration and the WASI environment with NULs shown as ';'.
VM_START_REPORT = """(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $envsizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    global.get $heap local.set $p
    global.get $heap local.get $n i32.add global.set $heap
    local.get $p)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (local $i i32)
    (drop (call $buf (i32.const 6) (i32.const 0) (local.get 1) (i32.const 8) (i32.const 12)))
    (drop (call $log (i32.const 3) (i32.load (i32.const 8)) (i32.load (i32.const 12))))
    (drop (call $envsizes (i32.const 0) (i32.const 4)))
    (drop (call $environ (i32.const 16) (i32.const 1024)))
    (block $done (loop $scan
      (br_if $done (i32.ge_u (local.get $i) (i32.load (i32.const 4))))
      (if (i32.eqz (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
        (then (i32.store8 (i32.add (i32.const 1024) (local.get $i)) (i32.const 59))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $scan)))
    (drop (call $log (i32.const 3) (i32.const 1024) (i32.load (i32.const 4))))
    i32.const 1))
"""

# A proxy-wasm (ABI 0.2.1) filter that adds `x-wasm: hello` to every response; served to
# real Envoy by the translator and fetcher tests.
MODULE_WAT = """
(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const 16) "x-wasm")
  (data (i32.const 32) "hello")
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $size)) (i32.const 200000))
      (then (global.set $heap (i32.const 1024))))
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $at))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 16) (i32.const 6) (i32.const 32) (i32.const 5)))
    (i32.const 0))
)
"""


# ---- host-state hammers: one host call repeated in a loop, to drive the host-state budget ----------------

_HAMMER_IMPORTS = """
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $sset (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $reg (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $setbuf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $setpairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $defm (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_record_metric" (func $recm (param i32 i64) (result i32)))
  (import "env" "proxy_set_property" (func $setprop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fdw (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $rand (param i32 i32) (result i32)))
"""

# Callout headers (:authority a, :method GET, :path /) in the proxy-wasm pairs format, at HAMMER_CALLOUT.
_CALLOUT = [(b":authority", b"a"), (b":method", b"GET"), (b":path", b"/")]
_CALLOUT_PAIRS = b"".join(
    [
        len(_CALLOUT).to_bytes(4, "little"),
        *(len(k).to_bytes(4, "little") + len(v).to_bytes(4, "little") for k, v in _CALLOUT),
        *(k + b"\0" + v + b"\0" for k, v in _CALLOUT),
    ]
)
HAMMER_CALLOUT = f"(i32.const 1024) (i32.const {len(_CALLOUT_PAIRS)})"
# Memory a hammer step may use: a changing 4-byte key at 96 (the loop counter), a fixed key "kkkk" at
# 1100, the payload (bytes 'a') at 65536, return slots at 16..31, scratch at 200.
HAMMER_KEY = "(i32.const 96) (i32.const 4)"
HAMMER_FIXED_KEY = "(i32.const 1100) (i32.const 4)"
HAMMER_PAYLOAD = 65536


def hammer(step: str, times: int, *, payload: int = 0, setup: str = "") -> str:
    """A module whose request-headers callback runs `setup`, then `step` (an i32 expression, usually one
    host call) `times` times with the counter stored as the 4-byte key at 96."""
    pages = (HAMMER_PAYLOAD + payload) // 65536 + 2
    escaped = "".join(f"\\{b:02x}" for b in _CALLOUT_PAIRS)
    return f"""(module {_HAMMER_IMPORTS}
  (memory (export "memory") {pages})
  (data (i32.const 1024) "{escaped}")
  (data (i32.const 1100) "kkkk")
  (func (export "malloc") (param i32) (result i32) i32.const {HAMMER_PAYLOAD})
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
  (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (local $i i32)
    (memory.fill (i32.const {HAMMER_PAYLOAD}) (i32.const 97) (i32.const {payload}))
    {setup}
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (i32.const {times})))
      (i32.store (i32.const 96) (local.get $i))
      (i32.store (i32.const 92) (block (result i32) {step}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    i32.const 0))
"""


def add_header(value: str) -> str:
    """A minimal proxy-wasm (ABI 0.2.1) filter that adds `x-wasm: VALUE` to requests, as text."""
    return f"""
(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "x-wasm")
  (data (i32.const 200) "{value}")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 200) (i32.const {len(value)})))
    (i32.const 0))
)
"""


#: The filter `wasm run REF` tests pull from a registry.
ADD_HEADER = add_header("pulled")
