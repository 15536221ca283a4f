"""The WASI preview1 subset Envoy's host provides, with the same stub answers.

stdout/stderr become INFO/ERROR log records, clocks and random are real, the environment comes
from the plugin's configuration (Envoy: VmConfig.environment_variables), and there is no filesystem.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any

from sidecar.wasm.host.abi import LogLevel

if TYPE_CHECKING:
    from sidecar.wasm.host.runtime import Runtime

__all__ = ["WASI_FUNCTIONS", "Wasi"]

Caller = Any

_SUCCESS, _BADF, _FAULT, _INVAL, _NOENT, _NOSYS, _NOTSUP = 0, 8, 21, 28, 44, 52, 58
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_FILETYPE_CHARACTER_DEVICE = 2


class Wasi:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def _env_items(self) -> list[bytes]:
        return [f"{k}={v}".encode() + b"\0" for k, v in self.rt.options.environment.items()]

    def fd_write(self, caller: Caller, fd: int, iovs: int, iovs_len: int, written_ptr: int) -> int:
        mem = self.rt.memory
        raw = mem.read(caller, iovs, 8 * (iovs_len & 0xFFFFFFFF))
        if raw is None:
            return _FAULT
        chunks: list[bytes] = []
        for i in range(iovs_len):
            ptr, size = struct.unpack_from("<II", raw, 8 * i)
            data = mem.read(caller, ptr, size)
            if data is None:
                return _FAULT
            chunks.append(data)
        if fd not in (1, 2):
            return _BADF
        text = b"".join(chunks)
        if not mem.put_u32(caller, written_ptr, len(text)):
            return _FAULT
        level = LogLevel.INFO if fd == 1 else LogLevel.ERROR
        if level >= self.rt.log_level:
            self.rt.log(level, text.decode(errors="replace").removesuffix("\n"))
        return _SUCCESS

    def fd_read(self, caller: Caller, *args: int) -> int:
        return _NOSYS

    def fd_close(self, caller: Caller, fd: int) -> int:
        return _NOTSUP

    def fd_seek(self, caller: Caller, fd: int, offset: int, whence: int, ret: int) -> int:
        return _NOTSUP

    def fd_fdstat_get(self, caller: Caller, fd: int, ret: int) -> int:
        if fd not in (1, 2):
            return _BADF
        stat = struct.pack("<BxHxxxxQQ", _FILETYPE_CHARACTER_DEVICE, 0, 64, 0)  # fd_write rights only
        return _SUCCESS if self.rt.memory.write(caller, ret, stat) else _FAULT

    def fd_fdstat_set_flags(self, caller: Caller, fd: int, flags: int) -> int:
        return _NOTSUP

    def fd_prestat_get(self, caller: Caller, fd: int, ret: int) -> int:
        return _BADF

    def fd_prestat_dir_name(self, caller: Caller, fd: int, ptr: int, size: int) -> int:
        return _NOTSUP

    def path_open(self, caller: Caller, *args: int) -> int:
        return _NOENT

    def path_filestat_get(self, caller: Caller, *args: int) -> int:
        return _NOENT

    def poll_oneoff(self, caller: Caller, subs: int, events: int, nsubs: int, nevents_ptr: int) -> int:
        return _SUCCESS if self.rt.memory.put_u32(caller, nevents_ptr, 0) else _FAULT

    def sched_yield(self, caller: Caller) -> int:
        return _SUCCESS

    def proc_exit(self, caller: Caller, code: int) -> None:
        from sidecar.wasm.host.runtime import ProcExit

        raise ProcExit(code)

    def random_get(self, caller: Caller, ptr: int, size: int) -> int:
        data = self.rt.random.getrandbits(8 * size).to_bytes(size, "little") if size > 0 else b""
        return _SUCCESS if self.rt.memory.write(caller, ptr, data) else _FAULT

    def clock_time_get(self, caller: Caller, clock: int, precision: int, ret: int) -> int:
        if clock == _CLOCK_REALTIME:
            now = time.time_ns()
        elif clock == _CLOCK_MONOTONIC:
            now = time.monotonic_ns()
        else:
            return _NOTSUP
        return _SUCCESS if self.rt.memory.put_u64(caller, ret, now) else _FAULT

    def clock_res_get(self, caller: Caller, clock: int, ret: int) -> int:
        return _SUCCESS if self.rt.memory.put_u64(caller, ret, 1) else _FAULT

    def environ_sizes_get(self, caller: Caller, count_ptr: int, size_ptr: int) -> int:
        items = self._env_items()
        mem = self.rt.memory
        ok = mem.put_u32(caller, count_ptr, len(items)) and mem.put_u32(caller, size_ptr, sum(map(len, items)))
        return _SUCCESS if ok else _FAULT

    def environ_get(self, caller: Caller, ptrs: int, buf: int) -> int:
        mem = self.rt.memory
        for i, item in enumerate(self._env_items()):
            if not (mem.put_u32(caller, ptrs + 4 * i, buf) and mem.write(caller, buf, item)):
                return _FAULT
            buf += len(item)
        return _SUCCESS

    def args_sizes_get(self, caller: Caller, count_ptr: int, size_ptr: int) -> int:
        ok = self.rt.memory.put_u32(caller, count_ptr, 0) and self.rt.memory.put_u32(caller, size_ptr, 0)
        return _SUCCESS if ok else _FAULT

    def args_get(self, caller: Caller, ptrs: int, buf: int) -> int:
        return _SUCCESS


WASI_FUNCTIONS: dict[str, tuple[str, str]] = {
    "fd_write": ("iiii", "i"),
    "fd_read": ("iiii", "i"),
    "fd_close": ("i", "i"),
    "fd_seek": ("iIii", "i"),
    "fd_fdstat_get": ("ii", "i"),
    "fd_fdstat_set_flags": ("ii", "i"),
    "fd_prestat_get": ("ii", "i"),
    "fd_prestat_dir_name": ("iii", "i"),
    "path_open": ("iiiiiIIii", "i"),
    "path_filestat_get": ("iiiii", "i"),
    "poll_oneoff": ("iiii", "i"),
    "sched_yield": ("", "i"),
    "proc_exit": ("i", ""),
    "random_get": ("ii", "i"),
    "clock_time_get": ("iIi", "i"),
    "clock_res_get": ("ii", "i"),
    "environ_sizes_get": ("ii", "i"),
    "environ_get": ("ii", "i"),
    "args_sizes_get": ("ii", "i"),
    "args_get": ("ii", "i"),
}
