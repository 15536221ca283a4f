"""allocator.tune_allocator: freed body-sized blocks are reused instead of faulted in again, an operator's
own thresholds win, and nothing about it can stop a worker from serving."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.config import SidecarConfig
from sidecar.extproc import allocator, workers
from sidecar.extproc.allocator import on_glibc, tune_allocator

needs_glibc = pytest.mark.skipif(not on_glibc(), reason="glibc's mallopt")

# Allocates, touches and frees blocks of the given MiB (a few body chunks: 1 1 1 1; a large BUFFERED body: 8),
# 100 rounds, and prints why the tuning was left out (or None; "untuned" when not called) and the page
# faults a round cost.
_ROUNDS = """
import resource, sys
from sidecar.extproc.allocator import tune_allocator
print(repr(tune_allocator()) if sys.argv[1] == "tune" else "untuned")
sizes = [int(mib) << 20 for mib in sys.argv[2:]]
def one_round():
    blocks = [bytearray(size) for size in sizes]
    for block in blocks:
        block[::4096] = b"x" * (len(block) // 4096)
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    one_round()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
"""


CHUNKS = (1, 1, 1, 1)


def _faults_per_round(*mib: int, tune: bool = True, env: dict[str, str] | None = None) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    command = [sys.executable, "-c", _ROUNDS, "tune" if tune else "no", *map(str, mib or CHUNKS)]
    why_not, faults = subprocess.run(
        command, env={**clean, **(env or {})}, capture_output=True, text=True, check=True
    ).stdout.split("\n")[:2]
    return why_not, float(faults)


@needs_glibc
@pytest.mark.parametrize("mib", [CHUNKS, (8,), (24, 1)])
def test_freed_body_blocks_are_reused_not_faulted_in_again(mib: tuple[int, ...]) -> None:
    why_not, faults = _faults_per_round(*mib)
    assert why_not == "None"
    assert faults < 16, f"{faults} page faults a round: the freed blocks went back to the kernel"


@needs_glibc
def test_without_it_glibc_faults_the_blocks_in_again() -> None:
    """The case the tuning is for, so the test above can fail: glibc's own thresholds give the 1 MiB blocks
    back to the kernel every round."""
    why_not, faults = _faults_per_round(tune=False)
    assert why_not == "untuned"
    assert faults > 512, f"only {faults} page faults a round with glibc's own thresholds"


@needs_glibc
@pytest.mark.parametrize(
    "name, value", [("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.cpu.x86_ibt=on")]
)
def test_other_malloc_settings_do_not_stop_it(name: str, value: str) -> None:
    why_not, faults = _faults_per_round(env={name: value})
    assert why_not == "None" and faults < 16


class FakeMallopt:
    """Stands for libc's mallopt: records its calls and answers `result` (1: done, 0: refused)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = 1
        self.argtypes: Any = None
        self.restype: Any = None

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.result


@pytest.fixture
def mallopt(monkeypatch: pytest.MonkeyPatch) -> FakeMallopt:
    for name in list(os.environ):
        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES":
            monkeypatch.delenv(name)
    fake = FakeMallopt()
    monkeypatch.setattr(allocator, "on_glibc", lambda: True)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=fake))
    return fake


def test_both_thresholds_are_set_trim_first(mallopt: FakeMallopt) -> None:
    assert tune_allocator() is None
    assert mallopt.calls == [(-1, allocator.TRIM_THRESHOLD), (-3, allocator.MMAP_THRESHOLD)]


@pytest.mark.parametrize(
    "name, value, why_not",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072", "MALLOC_MMAP_THRESHOLD_ is set"),
        ("MALLOC_TRIM_THRESHOLD_", "0", "MALLOC_TRIM_THRESHOLD_ is set"),
        ("MALLOC_TOP_PAD_", "0", "MALLOC_TOP_PAD_ is set"),
        ("MALLOC_MMAP_MAX_", "0", "MALLOC_MMAP_MAX_ is set"),
        (
            "GLIBC_TUNABLES",
            "glibc.cpu.hwcaps=-AVX:glibc.malloc.trim_threshold=0",
            "GLIBC_TUNABLES sets glibc.malloc.trim_threshold",
        ),
    ],
)
def test_an_operators_thresholds_are_kept(
    mallopt: FakeMallopt, monkeypatch: pytest.MonkeyPatch, name: str, value: str, why_not: str
) -> None:
    monkeypatch.setenv(name, value)
    assert tune_allocator() == why_not
    assert mallopt.calls == []


def test_not_glibc_is_left_alone(mallopt: FakeMallopt, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "on_glibc", lambda: False)
    assert tune_allocator() == "not glibc"
    assert mallopt.calls == []


def test_a_refused_threshold_is_said(mallopt: FakeMallopt) -> None:
    mallopt.result = 0
    assert tune_allocator() == "mallopt refused the thresholds"


def test_a_libc_without_mallopt_is_left_alone(mallopt: FakeMallopt, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace())
    assert tune_allocator() == "mallopt not found"


@pytest.mark.parametrize(
    "tune_malloc, why_not, logged",
    [
        (True, None, None),
        (True, "not glibc", "malloc thresholds left as they are: not glibc"),
        (False, None, "malloc thresholds left as they are: tune_malloc is false"),
    ],
)
def test_a_worker_tunes_as_its_config_says(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tune_malloc: bool,
    why_not: str | None,
    logged: str | None,
) -> None:
    calls: list[None] = []

    def tune() -> str | None:
        calls.append(None)
        return why_not

    monkeypatch.setattr(workers, "tune_allocator", tune)
    with caplog.at_level(logging.INFO, logger="sidecar.workers"):
        workers._tune_malloc(SidecarConfig(tune_malloc=tune_malloc))
    assert len(calls) == (1 if tune_malloc else 0)
    assert [r.getMessage() for r in caplog.records] == ([logged] if logged else [])
