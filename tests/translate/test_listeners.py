"""Listener conflicts and unknown protocols as EG decides them: the Gateway stays, the listeners EG refuses
are not served, the others are; a refused listener is one warning line naming file, listener and value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sidecar.errors import ConfigError
from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.listeners import listener_verdicts
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from sidecar.translate.resources import ResourceSet, parse_document
from tests.support.net import free_port
from tests.support.translate_kit import backend, loopback
from tests.support.translate_servers import NamedBackend


def _gateway(*listeners: str) -> str:
    return (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: eg}\n"
        "spec:\n  gatewayClassName: eg\n  listeners:\n" + "".join(f"    - {li}\n" for li in listeners)
    )


def _verdicts(*listeners: str) -> dict[str, str]:
    gateway = parse_document(yaml.safe_load(_gateway(*listeners)), "gw.yaml")
    return {v.listener["name"]: v.reason for v in listener_verdicts(ResourceSet([gateway]), gateway)}


@pytest.mark.parametrize(
    ("listeners", "expected"),
    [
        # Two protocol classes on one port: every non-UDP listener of the port is refused, no winner.
        (
            ["{name: a, protocol: HTTP, port: 80}", "{name: b, protocol: TCP, port: 80}"],
            {"a": "ProtocolConflict", "b": "ProtocolConflict"},
        ),
        (
            [
                "{name: a, protocol: HTTP, port: 80, hostname: a.com}",
                "{name: b, protocol: TLS, port: 80, tls: {mode: Passthrough}}",
            ],
            {"a": "ProtocolConflict", "b": "ProtocolConflict"},
        ),
        (
            [
                "{name: a, protocol: HTTP, port: 80}",
                "{name: b, protocol: HTTP, port: 80, hostname: b.com}",
                "{name: c, protocol: TCP, port: 80}",
                "{name: d, protocol: HTTP, port: 81}",
            ],
            {"a": "ProtocolConflict", "b": "ProtocolConflict", "c": "ProtocolConflict", "d": ""},
        ),
        # UDP is another socket: it shares a port with anything.
        (["{name: a, protocol: HTTP, port: 80}", "{name: u, protocol: UDP, port: 80}"], {"a": "", "u": ""}),
        # Same hostname (or none twice) on one port: both refused; distinct hostnames are fine.
        (
            ["{name: a, protocol: HTTP, port: 80}", "{name: b, protocol: HTTP, port: 80}"],
            {"a": "HostnameConflict", "b": "HostnameConflict"},
        ),
        (
            [
                "{name: a, protocol: HTTP, port: 80, hostname: x.com}",
                "{name: b, protocol: HTTP, port: 80, hostname: x.com}",
                "{name: c, protocol: HTTP, port: 80, hostname: '*.x.com'}",
                "{name: d, protocol: HTTP, port: 80}",
                "{name: e, protocol: HTTP, port: 81, hostname: x.com}",
            ],
            {"a": "HostnameConflict", "b": "HostnameConflict", "c": "", "d": "", "e": ""},
        ),
        # TCP (or UDP) twice on a port: the first stays.
        (
            ["{name: t1, protocol: TCP, port: 90}", "{name: t2, protocol: TCP, port: 90}"],
            {"t1": "", "t2": "ProtocolConflict"},
        ),
        (
            ["{name: u1, protocol: UDP, port: 90}", "{name: u2, protocol: UDP, port: 90}"],
            {"u1": "", "u2": "ProtocolConflict"},
        ),
        # A protocol EG does not know is refused on its own and takes no part in the conflicts.
        (
            ["{name: g, protocol: GRPC, port: 80}", "{name: a, protocol: HTTP, port: 80}"],
            {"g": "UnsupportedProtocol", "a": ""},
        ),
        (["{name: d, protocol: example.com/custom, port: 80}"], {"d": "UnsupportedProtocol"}),
        (["{name: typo, protocol: HTPP, port: 80}"], {"typo": "UnsupportedProtocol"}),
        (["{name: t, protocol: TCP, port: 90, hostname: a.com}"], {"t": "Invalid"}),
        # allowedRoutes.kinds of another group, or that the protocol does not take: not programmed.
        (
            [
                "{name: a, protocol: HTTP, port: 80, hostname: a.com, allowedRoutes: {kinds: [{kind: HTTPRoute}]}}",
                "{name: b, protocol: HTTP, port: 80, hostname: b.com, allowedRoutes: {kinds: [{kind: TCPRoute}]}}",
                "{name: c, protocol: HTTP, port: 80, hostname: c.com,"
                " allowedRoutes: {kinds: [{group: example.com, kind: HTTPRoute}]}}",
                "{name: d, protocol: HTTP, port: 80, hostname: d.com,"
                " allowedRoutes: {kinds: [{group: '', kind: HTTPRoute}]}}",
                "{name: e, protocol: HTTP, port: 80, allowedRoutes: {kinds: [{kind: GRPCRoute}, {kind: FooRoute}]}}",
            ],
            {"a": "", **dict.fromkeys("bcde", "InvalidRouteKinds")},
        ),
        # tls that does not fit the protocol: the listener is not programmed, and blocks nothing.
        (
            [
                "{name: h, protocol: HTTP, port: 80, tls: {certificateRefs: [{name: x}]}}",
                "{name: s, protocol: HTTPS, port: 80}",
                "{name: p, protocol: HTTPS, port: 80, tls: {mode: Passthrough, certificateRefs: [{name: x}]}}",
                "{name: t, protocol: TLS, port: 81}",
                "{name: u, protocol: UDP, port: 82, tls: {certificateRefs: [{name: x}]}}",
                "{name: ok, protocol: HTTP, port: 80}",
            ],
            {"h": "Invalid", "s": "Invalid", "p": "UnsupportedTLSMode", "t": "Invalid", "u": "Invalid", "ok": ""},
        ),
        # An HTTPS listener without a usable certificate is not served and blocks nothing.
        (
            [
                "{name: s, protocol: HTTPS, port: 80, tls: {certificateRefs: [{name: gone}]}}",
                "{name: a, protocol: HTTP, port: 80}",
            ],
            {"s": "InvalidCertificateRef", "a": ""},
        ),
    ],
)
def test_eg_decides_each_listener(listeners: list[str], expected: dict[str, str]) -> None:
    assert _verdicts(*listeners) == expected


ROUTE = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: eg, sectionName: {section}}}]
  rules:
    - backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: app}}]
"""


def _render(tmp_path: Path, text: str, **options: Any) -> dict[str, Any]:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    return render_bootstrap([path], RenderOptions(**({"ephemeral_ports": True} | options)))


def _listener_names(bootstrap: dict[str, Any]) -> list[str]:
    return [listener["name"] for listener in bootstrap["static_resources"]["listeners"]]


def test_the_gateway_stays_and_only_refused_listeners_go(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = (
        _gateway(
            "{name: good, protocol: HTTP, port: 80}",
            "{name: clash-a, protocol: HTTP, port: 81, hostname: a.com}",
            "{name: clash-b, protocol: HTTP, port: 81, hostname: a.com}",
            "{name: typo, protocol: HTPP, port: 82}",
        )
        + ROUTE.format(name="on-good", section="good")
        + ROUTE.format(name="on-clash", section="clash-a")  # EG accepts it; it is just not served
        + backend("app", loopback(8080))
    )
    with caplog.at_level("WARNING"):
        bootstrap = _render(tmp_path, text)
    assert _listener_names(bootstrap) == ["default/eg/good"]
    lines = [r.getMessage() for r in caplog.records if "is not served" in r.getMessage()]
    assert len(lines) == 3, lines
    typo = next(line for line in lines if "'typo'" in line)
    assert str(tmp_path / "gw.yaml") in typo and "spec.listeners[3].protocol" in typo and "'HTPP'" in typo
    assert all("HostnameConflict" in line and "'a.com'" in line for line in lines if "clash" in line)


def test_a_route_only_on_an_unknown_protocol_is_refused_naming_the_listener(tmp_path: Path) -> None:
    text = _gateway("{name: typo, protocol: HTPP, port: 80}") + ROUTE.format(name="r", section="typo")
    text += backend("app", loopback(8080))
    with pytest.raises(ConfigError) as caught:
        _render(tmp_path, text)
    message = str(caught.value)
    assert "HTTPRoute/default/r" in message and "spec.listeners[0].protocol" in message and "'HTPP'" in message
    assert getattr(caught.value, "reason", "") == "NotAllowedByListeners"


@pytest.mark.parametrize(
    ("listener", "field"),
    [
        ("{name: t, protocol: TCP, port: 90}", "spec.listeners[1].protocol: unsupported value 'TCP'"),
        ("{name: u, protocol: UDP, port: 80}", "spec.listeners[1].protocol: unsupported value 'UDP'"),
        ("{name: bad, protocol: 'no spaces', port: 90}", "spec.listeners[1].protocol"),
    ],
)
def test_what_eg_would_serve_and_this_translator_cannot_is_refused(tmp_path: Path, listener: str, field: str) -> None:
    text = _gateway("{name: good, protocol: HTTP, port: 80}", listener)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        _render(tmp_path, text)


def test_render_prints_one_line_per_refused_listener_and_renders(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        _gateway("{name: good, protocol: HTTP, port: 80}", "{name: typo, protocol: HTPP, port: 81}")
        + ROUTE.format(name="r", section="good")
        + backend("app", loopback(8080))
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "render", "-f", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "'typo'" in lines[0] and "'HTPP'" in lines[0] and "Traceback" not in done.stderr
    assert "default/eg/good" in done.stdout and "default/eg/typo" not in done.stdout


@pytest.mark.envoy
def test_in_envoy_the_good_listener_serves_and_the_refused_ones_do_not(tmp_path: Path) -> None:
    app = NamedBackend("app")
    good, clash, typo = free_port(), free_port(), free_port()
    text = (
        _gateway(
            f"{{name: good, protocol: HTTP, port: {good}}}",
            f"{{name: clash-http, protocol: HTTP, port: {clash}}}",
            f"{{name: clash-tcp, protocol: TCP, port: {clash}}}",
            f"{{name: typo, protocol: HTPP, port: {typo}}}",
        )
        + ROUTE.format(name="on-good", section="good")
        + ROUTE.format(name="on-clash", section="clash-http")
        + backend("app", loopback(app.port))
    )
    bootstrap = _render(tmp_path, text, listen_address="127.0.0.1", ephemeral_ports=False)
    validate_bootstrap(bootstrap)
    envoy = Envoy(bootstrap, workdir=tmp_path / "envoy")
    try:
        envoy.start()
        assert envoy.listener_address("default/eg/good") == ("127.0.0.1", good)
        assert httpx.get(f"http://127.0.0.1:{good}/x", timeout=10).status_code == 200
        for port in (clash, typo):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/x", timeout=10)
        assert app.paths == ["/x"]
    finally:
        envoy.close()
        app.close()


@pytest.mark.parametrize(
    ("kinds", "attaches"),
    [
        ("[{kind: HTTPRoute}]", True),
        ("[{group: gateway.networking.k8s.io, kind: HTTPRoute}, {kind: FooRoute}]", True),  # EG: attached, not served
        ("[{kind: GRPCRoute}]", False),
        ("[{group: example.com, kind: HTTPRoute}]", False),
    ],
)
def test_allowed_route_kinds_decide_what_attaches(tmp_path: Path, kinds: str, attaches: bool) -> None:
    text = (
        _gateway(f"{{name: http, protocol: HTTP, port: 80, allowedRoutes: {{kinds: {kinds}}}}}")
        + ROUTE.format(name="r", section="http")
        + backend("app", loopback(8080))
    )
    if attaches:
        _render(tmp_path, text)
        return
    with pytest.raises(ConfigError) as caught:
        _render(tmp_path, text)
    assert getattr(caught.value, "reason", "") == "NotAllowedByListeners"
