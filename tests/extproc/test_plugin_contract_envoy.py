"""The same broken plugins through the in-process Driver and through a real Envoy: the Driver reports what
the server does (status, error id header, body, log line), so a plugin author's test is the truth."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def _show_metadata(bootstrap: dict[str, Any]) -> None:
    """Envoy's view of the plugins' metadata, in response headers (empty when Envoy dropped it)."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["response_headers_to_add"] = [
        {"header": {"key": "x-meta-seen", "value": "%DYNAMIC_METADATA(other-ns:seen)%"}},
        {"header": {"key": "x-meta-count", "value": "%DYNAMIC_METADATA(other-ns:count)%"}},
    ]


#: (x-edit, method, chunked upload): what Envoy would cut, strip, reset or drop. Each is the plugin's error.
REFUSED = [
    ("cl-wrong", "POST", False),
    ("cl-wrong", "POST", True),
    ("te", "POST", True),
    ("te-remove", "POST", True),
    ("lead", "GET", False),
    ("respond-204", "GET", False),
    ("respond-cl", "GET", False),
    ("ns-undeclared", "GET", False),
    ("resp-connection", "GET", False),
    ("resp-cl", "GET", False),
    ("resp-trail", "GET", False),
]


def _pieces(body: bytes) -> Iterator[bytes]:
    yield body[:5]
    yield body[5:]


def test_what_envoy_would_cut_or_drop_is_the_plugins_error_on_both_sides(
    sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"""
chains:
  closed: {{on_error: fail_closed, plugins: ["{TP}Framing"]}}
  open: {{on_error: fail_open, plugins: ["{TP}Framing"]}}
"""
    )
    env = sidecar_envoy(config=config, routes=["/closed=closed", "/open=open"], bootstrap_hook=_show_metadata)
    registry = Registry([Chain("closed", [tp.Framing()]), Chain("open", [tp.Framing()], on_error="fail_open")])
    body = b"hello world"
    for http2 in (False, True):
        with httpx.Client(base_url=env.url, timeout=10, http1=not http2, http2=http2) as client:
            for edit, method, chunked in REFUSED:
                case = f"{edit} {method} chunked={chunked} http2={http2}"
                headers = {"x-edit": edit}

                def content() -> Iterator[bytes] | bytes | None:  # a fresh upload for each request
                    return (_pieces(body) if chunked else body) if method == "POST" else None  # noqa: B023

                driver_headers = dict(headers)
                if method == "POST":
                    driver_headers["transfer-encoding" if chunked else "content-length"] = (
                        "chunked" if chunked else str(len(body))
                    )
                request = Request(method, "/closed", driver_headers, list(_pieces(body)) if method == "POST" else b"")
                driven = Driver(registry, chain="closed").run(request)
                real = client.request(method, "/closed", headers=headers, content=content())
                assert real.status_code == driven.status == 500, case
                assert real.content == driven.response.body == b"Internal Server Error\n", case
                assert "x-sidecar-error-id" in real.headers and "x-sidecar-error-id" in driven.response.headers

                # fail_open: the broken edit is dropped, the request goes through whole.
                request.path = "/open"
                driven = Driver(registry, chain="open").run(request)
                real = client.request(method, "/open", headers=headers, content=content())
                assert real.status_code == driven.status == 200, case
                assert driven.upstream is not None
                echoed = real.json()
                assert echoed["body"].encode() == driven.upstream.body == (body if method == "POST" else b""), case
                assert "x-lead" not in echoed["headers"] and "x-trail" not in real.headers, case

            # Removing content-length is fine: Envoy frames the body itself.
            real = client.post("/closed", headers={"x-edit": "cl-remove"}, content=body)
            assert real.status_code == 200 and real.json()["body"] == "hello world"
            # A declared namespace reaches Envoy: the generated config accepts it.
            real = client.get("/closed", headers={"x-edit": "ns-other"})
            driven = Driver(registry, chain="closed").run(Request("GET", "/closed", {"x-edit": "ns-other"}))
            assert real.status_code == driven.status == 200
            assert real.headers["x-meta-seen"] == driven.dynamic_metadata["other-ns"]["seen"] == "yes"
            assert real.headers["x-meta-count"] == "3", real.headers["x-meta-count"]
            assert driven.dynamic_metadata["other-ns"]["count"] == 3
            assert type(driven.dynamic_metadata["other-ns"]["count"]) is int  # Envoy shows "3", not "3.0"


def test_a_chain_that_needs_less_than_the_filter_still_gets_its_body_hooks(
    sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path
) -> None:
    # Found by the differential suite: the BUFFERED chain's first answer carried only a mode_override (its
    # plugin has no header hook), with no phase set. Envoy took it for a spurious message: this request got
    # a 500, and in the suite others lost their later hooks. Every request of such a chain failed.
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"""
chains:
  upper: {{plugins: ["{TP}UpperBody"]}}
  stream: {{plugins: ["{TP}StreamPass"]}}
"""
    )
    env = sidecar_envoy(config=config, routes=["/upper=upper", "/stream=stream"])
    assert env.registry is not None and env.registry.mode_override(env.registry.chains["upper"]) is not None
    with httpx.Client(base_url=env.url, timeout=10) as client:
        real = client.post("/upper", content=b"secret")
        assert real.status_code == 200
        assert real.content.startswith(b"wrapped:")  # the response body hook ran
        assert json.loads(real.content[len(b"wrapped:") :])["body"] == "SECRETSECRET"  # and the request's
        rejected = client.post("/upper", content=b"reject me")
        assert rejected.status_code == 422
        assert client.post("/stream", content=b"as is").json()["body"] == "as is"
