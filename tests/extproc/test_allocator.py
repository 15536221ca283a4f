"""allocator.tune_allocator: freed body-sized blocks are reused instead of faulted in again, and an
operator's own malloc settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sidecar.extproc.allocator import on_glibc, tune_allocator

needs_glibc = pytest.mark.skipif(not on_glibc(), reason="glibc's mallopt")

# Allocates, touches and frees 4 MiB in 1 MiB blocks (what a few body chunks do), 100 times, and prints the
# page faults one round cost on average.
_ROUNDS = """
import resource
from sidecar.extproc.allocator import tune_allocator
print(tune_allocator())
def one_round():
    blocks = [bytearray(1 << 20) for _ in range(4)]
    for block in blocks:
        block[::4096] = b"x" * 256
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    one_round()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
"""


def _faults_per_round(**env: str) -> tuple[bool, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", float(out[1])


@needs_glibc
def test_freed_body_blocks_are_reused_not_faulted_in_again() -> None:
    tuned, faults = _faults_per_round()
    assert tuned
    assert faults < 16, f"{faults} page faults a round: the freed blocks went back to the kernel"


@needs_glibc
def test_without_it_glibc_faults_the_blocks_in_every_round() -> None:
    """The case the tuning is for, so the test above can fail: glibc's defaults (kept here because the
    operator set a malloc tunable of their own) give the 4 MiB back to the kernel every round."""
    tuned, faults = _faults_per_round(GLIBC_TUNABLES="glibc.malloc.perturb=0")
    assert not tuned
    assert faults > 512, f"only {faults} page faults a round with glibc's own thresholds"


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "0"),
        ("MALLOC_TOP_PAD_", "0"),
        ("MALLOC_ARENA_MAX", "2"),
        ("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX:glibc.malloc.trim_threshold=0"),
    ],
)
def test_an_operators_malloc_settings_are_kept(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    assert tune_allocator() is False


@needs_glibc
def test_other_glibc_tunables_do_not_stop_it() -> None:
    tuned, _ = _faults_per_round(GLIBC_TUNABLES="glibc.cpu.x86_rep_movsb_threshold=4096")
    assert tuned


def test_a_libc_without_mallopt_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoMallopt:
        def __init__(self, name: object) -> None:
            pass

    monkeypatch.setattr("sidecar.extproc.allocator.on_glibc", lambda: True)
    monkeypatch.setattr("sidecar.extproc.allocator.ctypes.CDLL", NoMallopt)
    assert tune_allocator() is False
