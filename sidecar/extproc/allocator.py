"""glibc's allocator set for a server that moves bodies: freed body buffers are reused, not re-faulted.

Each body chunk Envoy sends (up to about 1 MiB) passes through a few buffers of its size: the socket
read, the message assembled from its frames, the parsed body the hooks get. glibc serves blocks that large
from its heap once one was freed (its mmap threshold follows the largest freed block), but it hands the
heap's free top back to the kernel whenever that passes twice the threshold, so every body made the
kernel fault in and zero the same pages again: 40 - 250 page faults per MiB moved through a worker. With
the thresholds fixed, 0 - 5, and 10 MiB bodies went 4 - 27 % faster (docs/benchmarks.md, round 4).

Fixed thresholds keep up to `TRIM_THRESHOLD` of freed heap for the next body and serve blocks below
`MMAP_THRESHOLD` from the heap. Operators who tune malloc themselves (any `MALLOC_*` variable, or a
`glibc.malloc.*` tunable) get glibc's behaviour with their settings; other C libraries are left alone.
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


def on_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # not a GNU system
        return False


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; whether they were set."""
    if any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    if not on_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # a tuning only: a Python that cannot reach it serves all the same
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
