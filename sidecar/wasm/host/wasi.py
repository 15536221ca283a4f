"""The WASI preview1 subset Envoy's host provides, with the same stub answers.

stdout/stderr become INFO/ERROR log records, clocks and random are real, the environment comes
from the plugin's configuration (Envoy: VmConfig.environment_variables), and there is no filesystem.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from sidecar.wasm.host.abi import LogLevel
from sidecar.wasm.host.binding import I32, I64, HostState, host_function
from sidecar.wasm.host.errors import ProcExit

__all__ = ["Wasi"]

Caller = Any

_SUCCESS, _BADF, _FAULT, _INVAL, _NOENT, _NOSYS, _NOTSUP = 0, 8, 21, 28, 44, 52, 58
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_FILETYPE_CHARACTER_DEVICE = 2
_IOV_MAX = 1024  # Linux's (and wasi-libc's) limit on the vectors of one write


class Wasi:
    """The `wasi_snapshot_preview1` (and `wasi_unstable`) host functions, bound to one instance's state."""

    def __init__(self, state: HostState) -> None:
        self.state = state

    def _env_items(self) -> list[bytes]:
        return [f"{k}={v}".encode() + b"\0" for k, v in self.state.environment.items()]

    @host_function(params=(I32, I32, I32, I32), results=(I32,))
    def fd_write(self, caller: Caller, fd: int, iovs: int, iovs_len: int, written_ptr: int) -> int:
        mem = self.state.memory
        iovs_len &= 0xFFFFFFFF
        if iovs_len > _IOV_MAX:
            return _INVAL
        raw = mem.read(caller, iovs, 8 * iovs_len)
        if raw is None:
            return _FAULT
        vectors = [struct.unpack_from("<II", raw, 8 * i) for i in range(iovs_len)]
        if fd in (1, 2) and (LogLevel.INFO if fd == 1 else LogLevel.ERROR) >= self.state.log_level:
            total = sum(size for _, size in vectors)  # what the log record will keep: refused before copying
            self.state.budget.check(total, f"fd_write of {total} bytes to {'stdout' if fd == 1 else 'stderr'}")
        chunks: list[bytes] = []
        for ptr, size in vectors:
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
        if level >= self.state.log_level:
            self.state.log(level, text.decode(errors="replace").removesuffix("\n"))
        return _SUCCESS

    @host_function(params=(I32, I32, I32, I32), results=(I32,))
    def fd_read(self, caller: Caller, *args: int) -> int:
        return _NOSYS

    @host_function(params=(I32,), results=(I32,))
    def fd_close(self, caller: Caller, fd: int) -> int:
        return _NOTSUP

    @host_function(params=(I32, I64, I32, I32), results=(I32,))
    def fd_seek(self, caller: Caller, fd: int, offset: int, whence: int, ret: int) -> int:
        return _NOTSUP

    @host_function(params=(I32, I32), results=(I32,))
    def fd_fdstat_get(self, caller: Caller, fd: int, ret: int) -> int:
        if fd not in (1, 2):
            return _BADF
        stat = struct.pack("<BxHxxxxQQ", _FILETYPE_CHARACTER_DEVICE, 0, 64, 0)  # fd_write rights only
        return _SUCCESS if self.state.memory.write(caller, ret, stat) else _FAULT

    @host_function(params=(I32, I32), results=(I32,))
    def fd_fdstat_set_flags(self, caller: Caller, fd: int, flags: int) -> int:
        return _NOTSUP

    @host_function(params=(I32, I32), results=(I32,))
    def fd_prestat_get(self, caller: Caller, fd: int, ret: int) -> int:
        return _BADF

    @host_function(params=(I32, I32, I32), results=(I32,))
    def fd_prestat_dir_name(self, caller: Caller, fd: int, ptr: int, size: int) -> int:
        return _NOTSUP

    @host_function(params=(I32, I32, I32, I32, I32, I64, I64, I32, I32), results=(I32,))
    def path_open(self, caller: Caller, *args: int) -> int:
        return _NOENT

    @host_function(params=(I32, I32, I32, I32, I32), results=(I32,))
    def path_filestat_get(self, caller: Caller, *args: int) -> int:
        return _NOENT

    @host_function(params=(I32, I32, I32, I32), results=(I32,))
    def poll_oneoff(self, caller: Caller, subs: int, events: int, nsubs: int, nevents_ptr: int) -> int:
        return _SUCCESS if self.state.memory.put_u32(caller, nevents_ptr, 0) else _FAULT

    @host_function(results=(I32,))
    def sched_yield(self, caller: Caller) -> int:
        return _SUCCESS

    @host_function(params=(I32,))
    def proc_exit(self, caller: Caller, code: int) -> None:
        raise ProcExit(code)

    @host_function(params=(I32, I32), results=(I32,))
    def random_get(self, caller: Caller, ptr: int, size: int) -> int:
        ptr, size = ptr & 0xFFFFFFFF, size & 0xFFFFFFFF
        if ptr + size > self.state.memory.size(caller):
            return _FAULT  # checked before generating: the guest must not make the host build gigabytes
        data = self.state.random.getrandbits(8 * size).to_bytes(size, "little") if size > 0 else b""
        return _SUCCESS if self.state.memory.write(caller, ptr, data) else _FAULT

    @host_function(params=(I32, I64, I32), results=(I32,))
    def clock_time_get(self, caller: Caller, clock: int, precision: int, ret: int) -> int:
        if clock == _CLOCK_REALTIME:
            now = time.time_ns()
        elif clock == _CLOCK_MONOTONIC:
            now = time.monotonic_ns()
        else:
            return _NOTSUP
        return _SUCCESS if self.state.memory.put_u64(caller, ret, now) else _FAULT

    @host_function(params=(I32, I32), results=(I32,))
    def clock_res_get(self, caller: Caller, clock: int, ret: int) -> int:
        return _SUCCESS if self.state.memory.put_u64(caller, ret, 1) else _FAULT

    @host_function(params=(I32, I32), results=(I32,))
    def environ_sizes_get(self, caller: Caller, count_ptr: int, size_ptr: int) -> int:
        items = self._env_items()
        mem = self.state.memory
        ok = mem.put_u32(caller, count_ptr, len(items)) and mem.put_u32(caller, size_ptr, sum(map(len, items)))
        return _SUCCESS if ok else _FAULT

    @host_function(params=(I32, I32), results=(I32,))
    def environ_get(self, caller: Caller, ptrs: int, buf: int) -> int:
        mem = self.state.memory
        for i, item in enumerate(self._env_items()):
            if not (mem.put_u32(caller, ptrs + 4 * i, buf) and mem.write(caller, buf, item)):
                return _FAULT
            buf += len(item)
        return _SUCCESS

    @host_function(params=(I32, I32), results=(I32,))
    def args_sizes_get(self, caller: Caller, count_ptr: int, size_ptr: int) -> int:
        ok = self.state.memory.put_u32(caller, count_ptr, 0) and self.state.memory.put_u32(caller, size_ptr, 0)
        return _SUCCESS if ok else _FAULT

    @host_function(params=(I32, I32), results=(I32,))
    def args_get(self, caller: Caller, ptrs: int, buf: int) -> int:
        return _SUCCESS
