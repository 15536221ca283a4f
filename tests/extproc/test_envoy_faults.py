"""A sidecar worker killed or stalled under load, through a real Envoy with the config `envoy-config` writes.

Small and bounded (a few hundred requests over a few seconds, at a rate far below what the stack
serves); benchmarks/faults.py measures the same at half of maximum throughput. What must hold: no
request that starts after a kill fails, nor one that starts more than a second into a stall.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sidecar.testing import EnvoyHarness
from tests.support.load import Report, children, direct_response_listener, run_load
from tests.support.testplugins import TP
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

Factory = Callable[..., EnvoyHarness]
SECONDS = 3.0
RATE = 150.0
FAULT_AT = 1.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def two_workers(sidecar_envoy: Factory) -> Iterator[EnvoyHarness]:
    port = _free_port()

    def add_backend(bootstrap: dict[str, Any]) -> None:
        bootstrap["static_resources"]["listeners"].append(direct_response_listener("backend", port))

    env = sidecar_envoy(
        plugins=[TP + "AddHeaders"], workers=2, upstream=("127.0.0.1", port), bootstrap_hook=add_backend
    )
    wait_for(lambda: _healthy(env) == 2, what="both workers healthy in Envoy")
    yield env
    for pid in _workers(env):
        os.kill(pid, signal.SIGCONT)  # never leave a stopped worker behind a failed assertion


def _workers(env: EnvoyHarness) -> list[int]:
    assert env.sidecar is not None
    return children(env.sidecar.pid)


def _healthy(env: EnvoyHarness) -> int:
    assert env.envoy is not None
    lines = env.envoy.admin("/clusters").splitlines()
    return sum(1 for line in lines if line.startswith("envoy-sidecar::") and line.endswith("health_flags::healthy"))


def _load(env: EnvoyHarness, tick: Callable[[float], None]) -> Report:
    assert env.envoy is not None
    host, port = env.envoy.listener_address("main")
    return asyncio.run(run_load(host, port, seconds=SECONDS, rate=RATE, connections=8, max_requests=1000, on_tick=tick))


def test_no_request_after_a_kill_fails(two_workers: EnvoyHarness) -> None:
    victim = _workers(two_workers)[0]
    killed: list[float] = []

    def tick(elapsed: float) -> None:
        if not killed and elapsed >= FAULT_AT:
            os.kill(victim, signal.SIGKILL)
            killed.append(time.monotonic())

    report = _load(two_workers, tick)
    assert killed and len(report.outcomes) >= RATE * SECONDS * 0.8, report.summary()
    assert report.failed_between(killed[0]) == [], report.summary()
    assert len(report.failed) <= report.in_flight(killed[0]), report.summary()
    assert two_workers.envoy is not None
    # Envoy did see the dead worker (and stopped using it), rather than the kill missing the traffic.
    stats = two_workers.envoy.stats("cluster.envoy-sidecar.")
    assert stats["cluster.envoy-sidecar.outlier_detection.ejections_enforced_total"] >= 1, stats


def test_no_request_a_second_into_a_stall_fails(two_workers: EnvoyHarness) -> None:
    victim = _workers(two_workers)[0]
    marks: list[float] = []

    def tick(elapsed: float) -> None:
        if not marks and elapsed >= FAULT_AT:
            os.kill(victim, signal.SIGSTOP)
            marks.append(time.monotonic())
        elif len(marks) == 1 and elapsed >= FAULT_AT + 1.5:
            os.kill(victim, signal.SIGCONT)
            marks.append(time.monotonic())

    report = _load(two_workers, tick)
    assert len(marks) == 2 and len(report.outcomes) >= RATE * SECONDS * 0.8, report.summary()
    assert report.failed_between(marks[0] + 1.0) == [], report.summary()
    assert two_workers.envoy is not None
    stats = two_workers.envoy.stats("cluster.envoy-sidecar.health_check")
    assert stats["cluster.envoy-sidecar.health_check.failure"] >= 1, stats  # the stall was seen
    wait_for(lambda: _healthy(two_workers) == 2, what="the resumed worker healthy again")
