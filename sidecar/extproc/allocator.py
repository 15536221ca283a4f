"""glibc's allocator set for a server that moves bodies: freed body buffers are reused, not re-faulted.

Each body chunk Envoy sends (up to about 1 MiB) passes through a few buffers of its size: the socket
read, the message assembled from its frames, the parsed body the hooks get. glibc serves blocks that large
from its heap once one was freed (its mmap threshold follows the largest freed block, up to 32 MiB), but
it hands the heap's free top back to the kernel whenever that passes twice the threshold, so every body
made the kernel fault in and zero the same pages again: 40 - 250 page faults per MiB moved through a
worker, 0 - 5 with the thresholds fixed (docs/benchmarks.md, round 4).

Fixed, the thresholds are what glibc's own adjustment reaches at most: blocks below `MMAP_THRESHOLD` come
from the heap (a BUFFERED body of a few MiB too), and up to `TRIM_THRESHOLD` of free space at the heap's
top is kept for the next body instead of about twice the largest recent block. Free blocks below a live
one stay mapped either way, as with any malloc. An operator who sets glibc's threshold variables or
tunables keeps exactly their settings, `tune_malloc: false` keeps glibc's, and other C libraries are
left alone.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "on_glibc", "tune_allocator"]

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for its dynamic threshold on 64-bit
TRIM_THRESHOLD = 32 * 1024 * 1024
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: What an operator sets to choose these thresholds themselves (the environment and GLIBC_TUNABLES forms).
_THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_THRESHOLD_TUNABLES = (
    "glibc.malloc.mmap_threshold",
    "glibc.malloc.trim_threshold",
    "glibc.malloc.top_pad",
    "glibc.malloc.mmap_max",
)


def on_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or not a GNU system
        return False


def tune_allocator() -> str | None:
    """Fix glibc's mmap and trim thresholds for this process: None once set, else why they were left."""
    for name in _THRESHOLD_VARIABLES:
        if name in os.environ:
            return f"{name} is set"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    for tunable in _THRESHOLD_TUNABLES:
        if tunable in tunables:
            return f"GLIBC_TUNABLES sets {tunable}"
    if not on_glibc():
        return "not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # a tuning only: a Python that cannot reach it serves all the same
        return "mallopt not found"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) or not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return "mallopt refused the thresholds"
    return None
