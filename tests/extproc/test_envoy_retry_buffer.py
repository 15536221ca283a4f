"""What the ext_proc stream's `retry_policy` makes Envoy keep, and that the retry still does its job.

Envoy's ext_proc opens its gRPC stream with `setBufferBodyForRetry`: while the stream can still be retried,
Envoy's router keeps a copy of every message it sent, to replay it on another worker. It stops, and drops
the copy, when the sidecar's response headers arrive (the router resets its retry state then) or when the
copy would pass the async stream's buffer limit, 64 KiB (it gives the retry up: the cluster's
`retry_or_shadow_abandoned` counts it). Without a `retry_policy` it keeps nothing. So a streamed body costs
Envoy no copy: these tests hold Envoy 1.40 to that with 100 MiB bodies. The price is on the retry's side: a
FULL_DUPLEX upload sends its first chunks before any answer, so past 64 KiB it has no retry left, and the
one that meets a dead worker fails (closed) where a STREAMED one is replayed on the other worker.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import httpx
import pytest

from sidecar.stack.demo import pattern_bytes
from sidecar.testing import EnvoyHarness
from tests.support.heap import envoy_heap
from tests.support.load import children
from tests.support.testplugins import TP
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

Factory = Callable[..., EnvoyHarness]
MiB = 1024 * 1024
SIZE = 100 * MiB
#: Envoy's own streaming holds up to its 16 MiB stream window (FULL_DUPLEX peaks near 17 MiB); a copy of the
#: body would add all of it.
HEAP_BOUND = 48 * MiB
ABANDONED = "cluster.envoy-sidecar.retry_or_shadow_abandoned"


def _abandoned(env: EnvoyHarness) -> int:
    assert env.envoy is not None
    return env.envoy.stats(ABANDONED).get(ABANDONED, 0)


def _upload(client: httpx.Client, env: EnvoyHarness, size: int) -> None:
    answer = client.post(env.url + "/upload", content=pattern_bytes(size))
    assert answer.status_code == 200, answer.text
    assert answer.json()["body_length"] == size


def _download(client: httpx.Client, env: EnvoyHarness, size: int) -> None:
    with client.stream("GET", env.url + f"/bytes/{size}") as response:
        assert response.status_code == 200
        assert sum(len(piece) for piece in response.iter_bytes()) == size


@pytest.mark.parametrize("plugin", ["StreamPass", "FdPass"])
def test_envoy_keeps_no_copy_of_a_streamed_body(sidecar_envoy: Factory, plugin: str) -> None:
    env = sidecar_envoy(plugins=[TP + plugin])
    assert env.envoy is not None
    with httpx.Client(timeout=120) as client:
        _download(client, env, 1024)  # warm-up: the connection to the sidecar, Envoy's pools
        with envoy_heap(env.envoy) as up:
            _upload(client, env, SIZE)
        after_upload = _abandoned(env)
        with envoy_heap(env.envoy) as down:
            _download(client, env, SIZE)
    print(f"{plugin}: Envoy's heap +{up.grew / MiB:.1f} MiB up, +{down.grew / MiB:.1f} MiB down")
    assert up.grew < HEAP_BOUND, f"Envoy's heap grew {up.grew / MiB:.1f} MiB for a {SIZE // MiB} MiB upload"
    assert down.grew < HEAP_BOUND, f"Envoy's heap grew {down.grew / MiB:.1f} MiB for a {SIZE // MiB} MiB download"
    if plugin == "StreamPass":
        # STREAMED: the sidecar answers the headers before Envoy sends any body, so the copy ends there.
        assert _abandoned(env) == 0
    else:
        # FULL_DUPLEX: the body's first chunks may go before the sidecar's headers come back; then Envoy gives
        # the retry up at 64 KiB, once for the stream, rather than copying on. The download's body follows the
        # sidecar's answer to the response headers: nothing to give up there.
        assert after_upload <= 1
        assert _abandoned(env) == after_upload


@pytest.mark.parametrize("plugin", ["StreamPass", "FdPass"])
def test_streams_after_a_worker_kill(sidecar_envoy: Factory, plugin: str) -> None:
    """A new stream that meets the dead worker is retried on the other one, except a FULL_DUPLEX upload
    whose first 64 KiB went out before the failure showed: that one fails closed (500), and only that one
    (the failure ejects the worker). Without the `retry_policy` the STREAMED case fails too."""
    env = sidecar_envoy(plugins=[TP + plugin], workers=2)
    assert env.sidecar is not None and env.envoy is not None
    wait_for(lambda: _healthy(env) == 2, what="both workers healthy in Envoy")
    uploads: list[int] = []
    with httpx.Client(timeout=30) as client:
        for _ in range(4):
            _upload(client, env, 256 * 1024)  # a connection to each worker
        os.kill(children(env.sidecar.pid)[0], signal.SIGKILL)
        for _ in range(12):
            answer = client.post(env.url + "/upload", content=pattern_bytes(2 * MiB))
            uploads.append(answer.status_code)
            assert answer.status_code != 200 or answer.json()["body_length"] == 2 * MiB
            _download(client, env, 2 * MiB)  # no request body: retried whole, whatever the mode
    stats = env.envoy.stats("cluster.envoy-sidecar.")
    print(plugin, "uploads after the kill:", uploads)
    # The kill met traffic: Envoy found the dead worker and ejected it.
    assert stats["cluster.envoy-sidecar.outlier_detection.ejections_enforced_total"] >= 1, stats
    if plugin == "StreamPass":
        assert uploads == [200] * 12
    else:
        assert set(uploads) <= {200, 500} and uploads.count(500) <= 1, uploads


def _healthy(env: EnvoyHarness) -> int:
    assert env.envoy is not None
    lines = env.envoy.admin("/clusters").splitlines()
    return sum(1 for line in lines if line.startswith("envoy-sidecar::") and line.endswith("health_flags::healthy"))
