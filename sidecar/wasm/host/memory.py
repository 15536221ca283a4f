"""Bounds-checked access to a guest's linear memory, and handing data to the guest.

Every pointer the module gives the host is checked against the current memory size; a bad one makes
the host call return INVALID_MEMORY_ACCESS (as Envoy's host does) instead of faulting.
"""

from __future__ import annotations

import struct
from typing import Any

import wasmtime

from sidecar.wasm.host.abi import Status

__all__ = ["GuestMemory"]

Storelike = Any  # wasmtime.Store or wasmtime.Caller


class GuestMemory:
    def __init__(self, memory: wasmtime.Memory, allocate: wasmtime.Func) -> None:
        self._memory = memory
        self._allocate = allocate

    def size(self, store: Storelike) -> int:
        return int(self._memory.data_len(store))

    def _inside(self, store: Storelike, ptr: int, size: int) -> bool:
        return ptr >= 0 and size >= 0 and ptr + size <= self._memory.data_len(store)

    def read(self, store: Storelike, ptr: int, size: int) -> bytes | None:
        ptr, size = ptr & 0xFFFFFFFF, size & 0xFFFFFFFF
        if not self._inside(store, ptr, size):
            return None
        if size == 0:
            return b""
        return bytes(self._memory.read(store, ptr, ptr + size))

    def write(self, store: Storelike, ptr: int, data: bytes) -> bool:
        ptr &= 0xFFFFFFFF
        if not self._inside(store, ptr, len(data)):
            return False
        if data:
            self._memory.write(store, data, ptr)
        return True

    def put_u32(self, store: Storelike, ptr: int, value: int) -> bool:
        return self.write(store, ptr, struct.pack("<I", value & 0xFFFFFFFF))

    def put_u64(self, store: Storelike, ptr: int, value: int) -> bool:
        return self.write(store, ptr, struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF))

    def give(self, store: Storelike, data: bytes, ptr_ptr: int, size_ptr: int) -> Status:
        """Copy `data` into a fresh guest allocation and write (ptr, size) to the return slots.

        Empty data writes (0, 0) without allocating, like Envoy's host: some SDKs depend on it.
        """
        if not self._inside(store, ptr_ptr & 0xFFFFFFFF, 4) or not self._inside(store, size_ptr & 0xFFFFFFFF, 4):
            return Status.INVALID_MEMORY_ACCESS
        ptr = 0
        if data:
            ptr = int(self._allocate(store, len(data))) & 0xFFFFFFFF
            if ptr == 0 or not self.write(store, ptr, data):
                return Status.INVALID_MEMORY_ACCESS
        self.put_u32(store, ptr_ptr, ptr)
        self.put_u32(store, size_ptr, len(data))
        return Status.OK
