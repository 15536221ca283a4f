"""What `on_error` means beyond a raising plugin, through a real Envoy: a slow plugin, an unreachable sidecar.

A fail_open chain's routes let the request through unprocessed; a fail_closed chain's routes answer with
Envoy's error, whatever the other chains say. docs/reliability.md explains the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sidecar.testing import EnvoyHarness
from tests.support.testplugins import TP

pytestmark = pytest.mark.envoy

Factory = Callable[..., EnvoyHarness]


@pytest.fixture
def two_policies(sidecar_envoy: Factory, tmp_path: Path) -> EnvoyHarness:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"""
message_timeout: 0.25
chains:
  default: {{on_error: fail_closed, plugins: ["{TP}Slow"]}}
  open: {{on_error: fail_open, plugins: ["{TP}Slow"]}}
"""
    )
    return sidecar_envoy(config=config, routes=["/closed", "/open=open"])


def test_a_plugin_past_message_timeout_fails_only_the_fail_closed_chain(two_policies: EnvoyHarness) -> None:
    slow = {"x-delay": "1.0"}
    opened = httpx.get(two_policies.url + "/open", headers=slow, timeout=10)
    assert opened.status_code == 200
    assert "x-slow" not in opened.json()["headers"]  # through, but unprocessed
    closed = httpx.get(two_policies.url + "/closed", headers=slow, timeout=10)
    assert closed.status_code == 504


def test_a_slow_plugin_within_the_timeout_is_not_cut_short(two_policies: EnvoyHarness) -> None:
    # Longer than the retry back-off (which Envoy also makes the retry's per-try timeout): a stream
    # that is still open is never timed out by the retry policy.
    for path in ("/closed", "/open"):
        response = httpx.get(two_policies.url + path, headers={"x-delay": "0.15"}, timeout=10)
        assert response.status_code == 200
        assert response.json()["headers"]["x-slow"] == "done"


def test_an_unreachable_sidecar_fails_only_the_fail_closed_chain(two_policies: EnvoyHarness) -> None:
    assert two_policies.sidecar is not None
    assert httpx.get(two_policies.url + "/closed").status_code == 200
    assert two_policies.sidecar.stop() == 0
    opened = httpx.get(two_policies.url + "/open", timeout=10)
    assert opened.status_code == 200
    assert "x-slow" not in opened.json()["headers"]
    assert httpx.get(two_policies.url + "/closed", timeout=10).status_code == 500
