"""The same broken plugins through the in-process Driver and through a real Envoy: the Driver reports what
the server does (status, error id header, body, log line), so a plugin author's test is the truth."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sidecar.chains import Chain, Registry
from sidecar.stack.sidecar import SidecarProcess
from sidecar.testing import Driver, EnvoyHarness, Request
from tests.support import testplugins as tp
from tests.support.testplugins import TP
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

#: What `x-return` makes WrongResult return (tests/support/testplugins.py): wrong types, Respond objects
#: that fail their own checks inside the hook, and one valid Respond with an int header value.
CASES = [
    "int",
    "str",
    "dict",
    "false",
    "tuple",
    "class",
    "list",
    "bytes",
    "bad-header-value",
    "bad-header-name",
    "crlf",
    "int-header",
]


def _logged(sidecar: SidecarProcess, text: str) -> bool:
    return text in sidecar.logs()


def test_broken_plugins_end_the_same_through_the_driver_and_a_real_envoy(
    sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"""
chains:
  closed: {{on_error: fail_closed, plugins: ["{TP}WrongResult", "{TP}AddHeaders"]}}
  open: {{on_error: fail_open, plugins: ["{TP}WrongResult", "{TP}AddHeaders"]}}
  duplex: {{on_error: fail_closed, plugins: ["{TP}WrongYield"]}}
"""
    )
    env = sidecar_envoy(config=config, routes=["/closed=closed", "/open=open", "/duplex=duplex"])
    assert env.sidecar is not None
    sidecar = env.sidecar
    registry = Registry(
        [
            Chain("closed", [tp.WrongResult(), tp.AddHeaders()]),
            Chain("open", [tp.WrongResult(), tp.AddHeaders()], on_error="fail_open"),
            Chain("duplex", [tp.WrongYield()]),
        ]
    )
    with httpx.Client(base_url=env.url, timeout=10) as client:
        for case in CASES:
            driven = Driver(registry, chain="closed").run(Request(path="/closed", headers={"x-return": case}))
            real = client.get("/closed", headers={"x-return": case})
            assert real.status_code == driven.status, case
            assert driven.immediate
            if case == "int-header":
                assert real.headers["retry-after"] == driven.response.headers["retry-after"] == "3"
                assert real.content == driven.response.body == b"slow down\n"
                continue
            assert real.content == driven.response.body == b"Internal Server Error\n", case
            assert "x-sidecar-error-id" in driven.response.headers
            error_id: str = real.headers["x-sidecar-error-id"]
            wait_for(functools.partial(_logged, sidecar, error_id), what=f"error id of {case} in the log")
            (line,) = [line for line in sidecar.logs().splitlines() if error_id in line]
            assert "wrong-result" in line and "request_headers" in line, line
            assert "set-cookie" not in real.headers  # the CRLF case: nothing smuggled into the reply

            driven = Driver(registry, chain="open").run(Request(path="/open", headers={"x-return": case}))
            real = client.get("/open", headers={"x-return": case})
            if case == "int-header":
                assert real.status_code == driven.status == 429
                continue
            assert real.status_code == 200 and driven.upstream is not None, case  # fail_open: let through
            # Only the broken plugin is skipped: the next one in the chain still ran, on both sides.
            assert real.json()["headers"]["x-added"] == driven.upstream.headers["x-added"] == "yes", case

        driven = Driver(registry, chain="duplex").run(Request("POST", "/duplex", body=[b"abc"]))
        real = client.post("/duplex", content=b"abc")
        assert driven.failed is not None and driven.status == 500
        assert real.status_code == 500
        assert "failed in on_request_stream" in driven.failed
        wait_for(functools.partial(_logged, sidecar, "on_request_stream yielded int 403"), what="the duplex failure")
        # and the server goes on serving
        assert client.get("/closed").status_code == 200
