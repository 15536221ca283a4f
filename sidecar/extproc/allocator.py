"""glibc's allocator set for a server that moves bodies: freed body buffers are reused, not re-faulted.

Each body chunk Envoy sends (up to about 1 MiB) passes through a few buffers of its size: the socket
read, the message assembled from its frames, the parsed body the hooks get. glibc serves blocks that large
from its heap once one was freed (its mmap threshold follows the largest freed block), but it hands the
heap's free top back to the kernel whenever that passes twice the threshold, so every body made the
kernel fault in and zero the same pages again. Measured on a worker passing 10 MiB bodies on: about 75
page faults per MiB, and 8-11 % more throughput once the thresholds are fixed (docs/benchmarks.md).

Fixed thresholds keep up to `TRIM_THRESHOLD` of freed heap for the next body and serve blocks below
`MMAP_THRESHOLD` from the heap. Operators who tune malloc themselves (`MALLOC_*_` variables or glibc
malloc tunables) keep their settings; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "on_glibc", "tune_allocator"]

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def on_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # not a GNU system
        return False


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; whether they were set."""
    if any(name in os.environ for name in _OPERATOR_SETTINGS) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    if not on_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
