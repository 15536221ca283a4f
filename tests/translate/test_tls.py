"""HTTPS listeners (certificate from a Secret manifest) and BackendTLSPolicy (CA from a ConfigMap, SNI)."""

from __future__ import annotations

import base64
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.errors import ConfigError
from sidecar.stack.envoy import Envoy, validate_bootstrap
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from tests.support.translate_egxds import XDS, EgXds

pytestmark = [pytest.mark.envoy, pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA and one server certificate for www.example.com and backend.example.com, signed by it."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=tmp_path,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=www.example.com",
        cwd=tmp_path,
    )
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:www.example.com,DNS:backend.example.com\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        cwd=tmp_path,
    )
    return tmp_path


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        sni = getattr(self.connection, "server_hostname_seen", "")
        body = f"tls backend sni={sni}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def tls_backend(pki: Path) -> Iterator[int]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    seen: dict[str, str] = {}

    def remember(sock: ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        seen["sni"] = name or ""

    context.sni_callback = remember  # type: ignore[assignment]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    original = server.get_request

    def get_request() -> tuple[socket.socket, Any]:
        conn, addr = original()
        wrapped = context.wrap_socket(conn, server_side=True)
        wrapped.server_hostname_seen = seen.get("sni", "")  # type: ignore[attr-defined]
        return wrapped, addr

    server.get_request = get_request  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(5)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("hostname", ["backend.example.com", "other.example.com"])
def test_https_listener_and_backend_tls_policy(tmp_path: Path, pki: Path, tls_backend: int, hostname: str) -> None:
    ca = (pki / "ca.crt").read_text()
    indented_ca = "\n".join("    " + line for line in ca.splitlines())
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg}}
spec:
  gatewayClassName: eg
  listeners:
    - name: https
      protocol: HTTPS
      port: 443
      tls:
        mode: Terminate
        certificateRefs: [{{kind: Secret, name: www-cert}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: www-cert}}
type: kubernetes.io/tls
data:
  tls.crt: {_b64(pki / "server.crt")}
  tls.key: {_b64(pki / "server.key")}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: backend}}
spec:
  parentRefs: [{{name: eg}}]
  rules:
    - backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: secure}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: secure}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {tls_backend}}}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {{name: secure-tls}}
spec:
  targetRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: secure}}]
  validation:
    caCertificateRefs: [{{group: "", kind: ConfigMap, name: backend-ca}}]
    hostname: {hostname}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: backend-ca}}
data:
  ca.crt: |
{indented_ca}
"""
    path = tmp_path / "tls.yaml"
    path.write_text(text)
    bootstrap = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
    validate_bootstrap(bootstrap)
    with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
        host, port = envoy.listener_address("default/eg/https")
        client_context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        client_context.check_hostname = False  # we connect to 127.0.0.1; the chain is still verified
        with httpx.Client(verify=client_context, timeout=10) as client:
            response = client.get(f"https://{host}:{port}/")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://{host}:{port}/", timeout=10)  # the system trust store does not know our CA
    if hostname == "backend.example.com":
        assert response.status_code == 200
        assert response.text == "tls backend sni=backend.example.com"
    else:  # the backend's certificate does not name other.example.com: Envoy refuses it
        assert response.status_code == 503


def test_https_listeners_share_a_port_by_sni(tmp_path: Path, pki: Path) -> None:
    from tests.support.translate_servers import NamedBackend

    app = NamedBackend("app")
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg}}
spec:
  gatewayClassName: eg
  listeners:
    - {{name: default, protocol: HTTPS, port: 443, tls: {{certificateRefs: [{{name: cert}}]}}}}
    - {{name: www, protocol: HTTPS, port: 443, hostname: www.example.com, tls: {{certificateRefs: [{{name: cert}}]}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: cert}}
type: kubernetes.io/tls
data: {{tls.crt: {_b64(pki / "server.crt")}, tls.key: {_b64(pki / "server.key")}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: www-only}}
spec:
  parentRefs: [{{name: eg, sectionName: www}}]
  rules: [{{backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: app}}]}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: app}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {app.port}}}}}]
"""
    path = tmp_path / "sni.yaml"
    path.write_text(text)
    try:
        bootstrap = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
        validate_bootstrap(bootstrap)
        with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
            host, port = envoy.listener_address("default/eg/default")
            context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            with httpx.Client(verify=context, timeout=10) as client:
                by_sni = client.get(
                    f"https://{host}:{port}/",
                    headers={"host": "www.example.com"},
                    extensions={"sni_hostname": "www.example.com"},
                )
                context.check_hostname = False
            with httpx.Client(verify=context, timeout=10) as client:
                without_sni = client.get(f"https://{host}:{port}/", headers={"host": "www.example.com"})
        assert by_sni.status_code == 200 and by_sni.text == "app /"
        assert without_sni.status_code == 404  # the default chain's HCM has no route for it
    finally:
        app.close()


def _tls_case(name: str, port: int, policies: list[str], ref_port: bool = False) -> str:
    """A Backend `name` at the TLS backend, a route /name to it, and BackendTLSPolicies (YAML bodies)."""
    port_field = f", port: {port}" if ref_port else ""
    text = f"""
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: {name}}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {port}}}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: eg}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /{name}}}}}]
      backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: {name}{port_field}}}]
"""
    for index, body in enumerate(policies):
        section = re.search(r"TARGET_SECTION_(\w+)", body)
        if section:
            sectioned = (
                f"{{group: gateway.envoyproxy.io, kind: Backend, name: {name}, sectionName: '{section.group(1)}'}}"
            )
            body = body.replace(section.group(0), sectioned)
        text += f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {{name: {name}-{index}}}
spec:
{body.replace("TARGET", f"{{group: gateway.envoyproxy.io, kind: Backend, name: {name}}}")}
"""
    return text


def test_backend_tls_policy_details_as_eg(tmp_path: Path, pki: Path, tls_backend: int) -> None:
    """CA key fallback, subjectAltNames, the system trust store, a sectioned policy over a wildcard one, and
    the older of two conflicting policies: each decides what Envoy sends and accepts, in a real Envoy."""
    ca = "\n".join("    " + line for line in (pki / "ca.crt").read_text().splitlines())
    cas = "".join(
        f"""
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: {name}}}
data:
  {key}: |
{ca}
"""
        for name, key in (("ca", "ca.crt"), ("only-key", "bundle.pem"), ("tls-key", "tls.crt"))
    )

    def policy(hostname: str, ca_name: str | None = "ca", sans: str = "", section: str | None = None) -> str:
        target = "TARGET" if section is None else f"TARGET_SECTION_{section}"
        validation = f"    hostname: {hostname}\n"
        if ca_name:
            validation += f'    caCertificateRefs: [{{group: "", kind: ConfigMap, name: {ca_name}}}]\n'
        else:
            validation += "    wellKnownCACertificates: System\n"
        if sans:
            validation += f"    subjectAltNames: {sans}\n"
        return f"  targetRefs: [{target}]\n  validation:\n{validation}"

    port = tls_backend
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg}}
spec:
  gatewayClassName: eg
  listeners: [{{name: http, protocol: HTTP, port: 80}}]
{cas}"""
    text += _tls_case("only-key", port, [policy("backend.example.com", "only-key")])
    text += _tls_case("tls-key", port, [policy("backend.example.com", "tls-key")])
    text += _tls_case(
        "san-ok", port, [policy("sni.example.com", sans="[{type: Hostname, hostname: backend.example.com}]")]
    )
    text += _tls_case(
        "san-bad", port, [policy("backend.example.com", sans="[{type: Hostname, hostname: nothere.example.com}]")]
    )
    text += _tls_case("system", port, [policy("backend.example.com", None)])
    text += _tls_case(
        "sectioned",
        port,
        [policy("wildcard.example.com"), policy("backend.example.com", section=str(port))],
        ref_port=True,
    )
    text += _tls_case(
        "other-section",
        port,
        [policy("backend.example.com"), policy("wildcard.example.com", section="1")],
        ref_port=True,
    )
    text += _tls_case("conflict", port, [policy("backend.example.com"), policy("other.example.com")])
    path = tmp_path / "tls.yaml"
    path.write_text(text)
    bootstrap = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
    validate_bootstrap(bootstrap)
    with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
        host, listen = envoy.listener_address("default/eg/http")

        def get(name: str) -> tuple[int, str]:
            response = httpx.get(f"http://{host}:{listen}/{name}", timeout=10)
            return response.status_code, response.text

        assert get("only-key") == (200, "tls backend sni=backend.example.com")  # the ConfigMap's only key
        assert get("tls-key") == (200, "tls backend sni=backend.example.com")  # tls.crt when no ca.crt
        # subjectAltNames replace the hostname as what the certificate must name; SNI stays the hostname.
        assert get("san-ok") == (200, "tls backend sni=sni.example.com")
        assert get("san-bad")[0] == 503
        assert get("system")[0] == 503  # our test CA is not in the system store: refused, not sent in clear
        assert get("sectioned") == (200, "tls backend sni=backend.example.com")  # the sectioned policy wins
        assert get("other-section") == (200, "tls backend sni=backend.example.com")  # another port's does not apply
        assert get("conflict") == (200, "tls backend sni=backend.example.com")  # the older policy applies


def _configmap(name: str, pem: Path) -> str:
    body = "\n".join("    " + line for line in pem.read_text().splitlines())
    return f"\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata:\n  ca.crt: |\n{body}\n"


def _backend_with_tls(name: str, port: int, tls: str) -> str:
    """A Backend `name` at the TLS backend with `spec.tls` (YAML flow mapping) and a route /name to it."""
    return _tls_case(name, port, []).replace(
        f"  endpoints: [{{ip: {{address: 127.0.0.1, port: {port}}}}}]\n",
        f"  endpoints: [{{ip: {{address: 127.0.0.1, port: {port}}}}}]\n  tls: {tls}\n",
        1,
    )


def test_a_backends_own_tls_settings_as_eg(tmp_path: Path, pki: Path, tls_backend: int) -> None:
    """Backend `spec.tls` in a real Envoy: the CA it names and the SNI it sets decide what Envoy accepts
    and sends; a wrong CA, a wrong name or the system store (which lacks the test CA) is refused, never
    sent in clear; insecureSkipVerify connects unverified; a BackendTLSPolicy wins over the Backend's CA
    and SNI; a CA that does not load makes the route answer 500."""
    port = tls_backend
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 80}]
"""
    other = ("-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt", "-days", "2")
    _openssl("req", "-x509", *other, "-subj", "/CN=another-ca", cwd=pki)
    text += _configmap("ca", pki / "ca.crt") + _configmap("not-the-ca", pki / "other.crt")
    ca = '[{group: "", kind: ConfigMap, name: ca}]'
    cases = {
        "own-ca": f"{{sni: backend.example.com, caCertificateRefs: {ca}}}",
        "own-ca-no-sni": f"{{caCertificateRefs: {ca}}}",
        "wrong-sni": f"{{sni: nothere.example.com, caCertificateRefs: {ca}}}",
        "wrong-ca": '{sni: backend.example.com, caCertificateRefs: [{group: "", kind: ConfigMap, name: not-the-ca}]}',
        "missing-ca": '{sni: backend.example.com, caCertificateRefs: [{group: "", kind: ConfigMap, name: absent}]}',
        "system": "{sni: backend.example.com, wellKnownCACertificates: System}",
        "skip": "{sni: www.example.com, insecureSkipVerify: true}",
        "skip-no-sni": "{insecureSkipVerify: true}",
        "policy-wins": "{sni: nothere.example.com, wellKnownCACertificates: System}",
        "policy-supplies-ca": "{}",
    }
    for name, tls in cases.items():
        text += _backend_with_tls(name, port, tls)
    for name in ("policy-wins", "policy-supplies-ca"):
        text += f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {{name: {name}}}
spec:
  targetRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: {name}}}]
  validation: {{hostname: backend.example.com, caCertificateRefs: {ca}}}
"""
    path = tmp_path / "tls.yaml"
    path.write_text(text)
    bootstrap = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
    validate_bootstrap(bootstrap)
    with Envoy(bootstrap, workdir=tmp_path / "envoy") as envoy:
        host, listen = envoy.listener_address("default/eg/http")

        def get(name: str, authority: str = "www.example.com") -> tuple[int, str]:
            response = httpx.get(f"http://{host}:{listen}/{name}", headers={"host": authority}, timeout=10)
            return response.status_code, response.text

        assert get("own-ca") == (200, "tls backend sni=backend.example.com")
        # No SNI set: as in EG, the request's host is the SNI and the name the certificate must carry, so a
        # certificate of the CA for one name is not accepted for any host.
        assert get("own-ca-no-sni", "backend.example.com") == (200, "tls backend sni=backend.example.com")
        assert get("own-ca-no-sni", "backend.example.com:8080") == (200, "tls backend sni=backend.example.com")
        assert get("own-ca-no-sni", "evil.example.com")[0] == 503
        assert get("skip-no-sni", "evil.example.com") == (200, "tls backend sni=evil.example.com")
        assert get("wrong-sni")[0] == 503  # the SNI is also the name the certificate must carry
        assert get("wrong-ca")[0] == 503  # a CA that did not sign the backend's certificate
        assert get("missing-ca")[0] == 500
        assert get("system")[0] == 503
        assert get("skip") == (200, "tls backend sni=www.example.com")
        assert get("policy-wins") == (200, "tls backend sni=backend.example.com")
        assert get("policy-supplies-ca") == (200, "tls backend sni=backend.example.com")


@pytest.mark.parametrize(
    "tls",
    [
        "{}",
        "{sni: backend.example.com}",
        "{insecureSkipVerify: false}",
        '{wellKnownCACertificates: System, caCertificateRefs: [{group: "", kind: ConfigMap, name: ca}]}',
        "{wellKnownCACertificates: example.com/bundle}",
        "{sni: '*.example.com', insecureSkipVerify: true}",
        "{insecureSkipVerify: true, minVersion: '1.3'}",
        "{insecureSkipVerify: true, clientCertificateRef: {name: client}}",
        "[]",
    ],
)
def test_backend_tls_that_cannot_verify_is_refused_by_name(tmp_path: Path, tls: str) -> None:
    """TLS with no CA and no skip (as EG: the Backend is Invalid), or fields not implemented: one clear error
    naming the Backend's spec.tls, never a cluster that would connect unverified."""
    path = tmp_path / "tls.yaml"
    path.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: eg}\nspec:\n"
        "  gatewayClassName: eg\n  listeners: [{name: http, protocol: HTTP, port: 80}]\n"
        + _backend_with_tls("b", 8443, tls)
    )
    with pytest.raises(ConfigError, match=r"Backend/default/b: spec\.tls"):
        render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))


def test_a_policy_in_another_namespace_does_not_supply_a_backends_ca(tmp_path: Path) -> None:
    """EG's Backend check counts a BackendTLSPolicy naming the Backend from any namespace, but a policy only
    ever targets its own: the render stops with the policy named, never a cluster without verification."""
    path = tmp_path / "tls.yaml"
    path.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: eg}\nspec:\n"
        "  gatewayClassName: eg\n  listeners: [{name: http, protocol: HTTP, port: 80}]\n"
        + _backend_with_tls("b", 8443, "{}")
        + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: BackendTLSPolicy\n"
        "metadata: {name: elsewhere, namespace: x}\nspec:\n"
        "  targetRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]\n"
        "  validation: {hostname: backend.example.com, wellKnownCACertificates: System}\n"
    )
    with pytest.raises(ConfigError, match=r"BackendTLSPolicy/x/elsewhere: spec\.targetRefs\[0\]"):
        render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))


@pytest.mark.skipif(not XDS.is_dir(), reason="EG reference data (../shared) not present")
def test_skip_verify_gives_the_same_traffic_as_egs_xds(tmp_path: Path, tls_backend: int) -> None:
    """EG's `backend-tls-skip-verify` xDS and our render of a Backend with `tls: {insecureSkipVerify: true}`,
    in two real Envoys before the same TLS backend: for each request host, the same status and the same SNI
    reaching the backend (EG's auto SNI: the host, without its port)."""
    eg = EgXds.load("backend-tls-skip-verify").bootstrap("127.0.0.1", ("127.0.0.1", tls_backend))
    path = tmp_path / "tls.yaml"
    path.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: eg}\nspec:\n"
        "  gatewayClassName: eg\n  listeners: [{name: http, protocol: HTTP, port: 80}]\n"
        + _backend_with_tls("app", tls_backend, "{insecureSkipVerify: true}").replace("value: /app", "value: /")
    )
    ours = render_bootstrap([path], RenderOptions(listen_address="127.0.0.1", ephemeral_ports=True))
    hosts = ["www.example.com", "backend.example.com:8080", "Evil.Example.COM", "127.0.0.1", "[::1]:80", "a" * 63]
    outcomes: dict[str, list[tuple[int, str]]] = {}
    for bootstrap, name, listener in ((eg, "eg", "first-listener"), (ours, "ours", "default/eg/http")):
        validate_bootstrap(bootstrap)
        with Envoy(bootstrap, workdir=tmp_path / name) as envoy:
            address, port = envoy.listener_address(listener)
            outcomes[name] = [
                (r.status_code, r.text)
                for r in (httpx.get(f"http://{address}:{port}/x", headers={"host": h}, timeout=10) for h in hosts)
            ]
    assert outcomes["eg"] == outcomes["ours"]
    assert (200, "tls backend sni=www.example.com") in outcomes["ours"]
