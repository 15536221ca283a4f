"""A worker whose event loop stops turning: here code blocked in C while it holds the GIL (no deadline reaches it).

In FULL_DUPLEX_STREAMED Envoy applies no message timeout and the sidecar's own `stream_timeout` runs on the
stuck loop, so before the stall watchdog (`sidecar/extproc/stall.py`) such a stream waited for Envoy's stream
idle timeout (5 minutes) and the worker stayed stuck for good. Now the worker dumps its stacks and exits after
`stall_timeout`, the stream fails closed, and the supervisor starts a fresh worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sidecar.testing import EnvoyHarness
from tests.support.load import children
from tests.support.testplugins import TP
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

STALL_TIMEOUT = 2


def test_a_worker_stuck_in_c_is_ended_and_replaced(sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"stall_timeout: {STALL_TIMEOUT}\nplugins: ['{TP}FdRegexStall']\n")
    env = sidecar_envoy(config=config, workers=2)
    assert env.sidecar is not None
    supervisor = env.sidecar.pid
    first = set(children(supervisor))
    assert len(first) == 2
    with httpx.Client(timeout=60) as client:
        started = time.monotonic()
        stuck = client.post(env.url + "/upload", content=b"stall" + b"x" * 4096)
        took = time.monotonic() - started
        # Failed closed when the stuck worker ended: within its stall_timeout and a restart, not Envoy's 5 minutes.
        assert stuck.status_code == 500, stuck.text
        assert took < STALL_TIMEOUT + 10, took
        wait_for(lambda: len(set(children(supervisor)) - first) == 1, what="a fresh worker in the stuck one's place")
        for _ in range(4):
            answer = client.post(env.url + "/upload", content=b"fine" * 1024)
            assert answer.status_code == 200 and answer.json()["body_length"] == 4096
    logs = env.logs()
    # faulthandler's dump names the call that held the loop, for whoever reads the log afterwards.
    assert "Timeout (0:00:02)!" in logs and "testplugins.py" in logs and "on_request_stream" in logs


def test_a_quiet_worker_is_left_alone(sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path) -> None:
    """The watchdog is re-armed from the loop: an idle worker (nothing to do for longer than stall_timeout)
    and one that finished a long but turning stream keep running."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"stall_timeout: {STALL_TIMEOUT}\nplugins: ['{TP}FdRegexStall']\n")
    env = sidecar_envoy(config=config)
    assert env.sidecar is not None
    with httpx.Client(timeout=60) as client:
        assert client.post(env.url + "/upload", content=b"fine").status_code == 200
        time.sleep(3 * STALL_TIMEOUT)  # the input under test (not a synchronisation): idle for three stall timeouts
        assert env.sidecar.proc is not None and env.sidecar.proc.poll() is None
        assert client.post(env.url + "/upload", content=b"fine").status_code == 200
    assert "Timeout (" not in env.logs()
