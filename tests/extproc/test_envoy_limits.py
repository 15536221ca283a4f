"""The transport's limits against a real Envoy 1.40: its defaults and short timeouts never fail a request."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pytest

from sidecar.testing import EnvoyHarness
from tests.support.testplugins import TP
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

Factory = Callable[..., EnvoyHarness]

IDLE_CLOSE = "closing an idle HTTP/2 connection"


def test_envoy_reconnects_after_the_idle_goaway_without_failing_a_request(
    sidecar_envoy: Factory, tmp_path: Path
) -> None:
    """Envoy sends no PINGs to the sidecar (its cluster sets no connection_keepalive) and keeps idle
    upstream connections for an hour. A sidecar idle timeout shorter than that ends them with the
    two-step GOAWAY, which Envoy handles by opening a new connection for the next request."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"plugins: ['{TP}AddHeaders']\nlimits: {{idle_timeout: 0.5, handshake_timeout: 2}}\n")
    env = sidecar_envoy(config=config)
    sidecar = env.sidecar
    assert sidecar is not None
    for round_ in range(1, 4):
        response = httpx.get(env.url + "/echo", timeout=10)
        assert response.status_code == 200
        assert response.json()["headers"]["x-added"] == "yes"
        closes = partial(lambda at_least: sidecar.logs().count(IDLE_CLOSE) >= at_least, round_)
        wait_for(closes, timeout=10, what="the idle GOAWAY")
    assert "closing HTTP/2 connection" not in sidecar.logs()  # no limit took Envoy for a flood
