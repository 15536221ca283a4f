from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from sidecar.chains import Registry
from sidecar.errors import PluginLoadError
from sidecar.testing import Driver, EnvoyHarness, Request
from sidecar_plugins.stamp import HeaderStamp


def test_stamps_request_and_times_response() -> None:
    result = Driver([HeaderStamp({"request_header": "x-by", "value": "me"})]).run(
        Request(headers={"x-request-id": "abc"})
    )
    assert result.upstream is not None
    assert result.upstream.headers["x-by"] == "me"
    assert result.response.headers["x-request-id"] == "abc"
    timing = result.response.headers["server-timing"]
    assert timing.startswith("sidecar;dur=")
    assert float(timing.split("=")[1]) >= 0


def test_unknown_option_is_a_load_error() -> None:
    from sidecar.config import ChainSpec, PluginSpec

    with pytest.raises(PluginLoadError, match="unknown option"):
        Registry.from_specs([ChainSpec("default", (PluginSpec("header-stamp", {"colour": "red"}),))])


@pytest.mark.envoy
def test_through_real_envoy(sidecar_envoy: Callable[..., EnvoyHarness]) -> None:
    env = sidecar_envoy(plugins=["header-stamp"])
    response = httpx.get(env.url + "/", headers={"x-request-id": "req-42"})
    assert response.json()["headers"]["x-stamped-by"] == "envoy-sidecar"
    assert response.headers["x-request-id"] == "req-42"
    assert response.headers["server-timing"].startswith("sidecar;dur=")
