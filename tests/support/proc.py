"""What /proc says about a process, for tests and benchmarks: CPU time, page faults, memory (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_seconds", "minor_faults", "rss", "status_kib"]

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses): state first."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far (10 ms ticks on most kernels)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def minor_faults(pid: int) -> int:
    """Page faults served without I/O so far: each a page the kernel mapped (and zeroed) for the process."""
    return int(_stat(pid)[7])  # minflt


def status_kib(pid: int, field: str) -> int:
    """A KiB-valued line of /proc/PID/status, such as VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def rss(pid: int) -> int:
    """Resident memory now, bytes."""
    return status_kib(pid, "VmRSS") * 1024
