"""HTTPS listener certificates as EG decides them: what a listener serves, and what it does without any.

Certificates come from openssl (RSA and EC, expired, mismatched) and from hand-damaged PEM/DER (truncated,
lengths past the end, a date in the future, blocks of the wrong kind): inputs a Secret's author controls.
"""

from __future__ import annotations

import base64
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.translate.certificates import ListenerCertificates, listener_certificates
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from sidecar.translate.resources import ResourceSet, parse_document

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """PEM files: rsa.crt/rsa.key, ec.crt/ec.key (the key after an EC PARAMETERS block), old.crt (expired)."""
    where = tmp_path_factory.mktemp("pki")
    rsa = ("-newkey", "rsa:2048", "-nodes", "-keyout", "rsa.key", "-out", "rsa.crt", "-days", "2", "-subj", "/CN=rsa")
    _openssl(where, "req", "-x509", *rsa)
    _openssl(where, "ecparam", "-name", "prime256v1", "-genkey", "-out", "ec.key")  # EC PARAMETERS, then the key
    _openssl(where, "req", "-new", "-x509", "-key", "ec.key", "-out", "ec.crt", "-days", "2", "-subj", "/CN=ec")
    _openssl(where, "req", "-new", "-key", "ec.key", "-out", "old.csr", "-subj", "/CN=old")
    _openssl(where, "x509", "-req", "-in", "old.csr", "-signkey", "ec.key", "-days", "-1", "-out", "old.crt")
    return {p.name: p.read_bytes() for p in where.iterdir()}


GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg}
spec:
  gatewayClassName: eg
  listeners:
    - {name: http, protocol: HTTP, port: 80}
    - name: https
      protocol: HTTPS
      port: 443
      tls: {certificateRefs: REFS}
"""


def _secret(
    name: str, crt: bytes, key: bytes, namespace: str = "default", kind: str | None = "kubernetes.io/tls"
) -> str:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"tls.crt": base64.b64encode(crt).decode(), "tls.key": base64.b64encode(key).decode()},
    }
    if kind is not None:
        doc["type"] = kind
    return "---\n" + yaml.safe_dump(doc)


def _decide(refs: list[dict[str, Any]], extra: str) -> ListenerCertificates:
    text = GATEWAY.replace("REFS", yaml.safe_dump(refs, default_flow_style=True).strip()) + extra
    resources = ResourceSet(parse_document(d, f"in#{i}") for i, d in enumerate(yaml.safe_load_all(text)) if d)
    gateway = resources.get("Gateway", "default", "eg")
    assert gateway is not None
    return listener_certificates(resources, gateway, gateway.spec["listeners"][1])


def _pem_der(pem: bytes) -> bytes:
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return base64.b64decode(body)


def _to_pem(der: bytes) -> bytes:
    return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"


def test_good_rsa_and_ec_pairs_are_served(pems: dict[str, bytes]) -> None:
    found = _decide(
        [{"name": "rsa"}, {"name": "ec"}],
        _secret("rsa", pems["rsa.crt"], pems["rsa.key"]) + _secret("ec", pems["ec.crt"], pems["ec.key"]),
    )
    assert found.programmed and found.reason == "" and len(found.pairs) == 2
    assert "EC PARAMETERS" not in found.pairs[1][1]  # the key block only, as EG hands it to Envoy


def _future(pem: bytes) -> bytes:
    """The certificate with notBefore moved to 2049 (UTCTime "49..."): same length, so the DER stays well formed."""
    der = bytearray(_pem_der(pem))
    # The first UTCTime (tag 0x17, 13 bytes YYMMDDHHMMSSZ) is notBefore. Not just the first 0x17 byte: the
    # random serial number before it holds one in about 1 run of 12, and the test failed then.
    found = re.search(rb"\x17\x0d[0-9]{12}Z", der)
    assert found is not None
    der[found.start() + 2 : found.start() + 4] = b"49"
    return _to_pem(bytes(der))


def _truncated(pem: bytes) -> bytes:
    return _to_pem(_pem_der(pem)[:200])


def _length_past_the_end(pem: bytes) -> bytes:
    der = bytearray(_pem_der(pem))
    der[1:4] = b"\x82\xff\xff"  # Certificate SEQUENCE claims 65535 bytes
    return _to_pem(bytes(der))


@pytest.mark.parametrize(
    ("crt", "key", "kind", "says"),
    [
        ("old.crt", "ec.key", "kubernetes.io/tls", "expired"),
        ("future", "ec.key", "kubernetes.io/tls", "valid only from 2049"),
        ("rsa.crt", "ec.key", "kubernetes.io/tls", "not a usable pair"),
        ("ec.crt", "rsa.key", "kubernetes.io/tls", "not a usable pair"),
        ("truncated", "ec.key", "kubernetes.io/tls", "cannot be parsed"),
        ("past-the-end", "ec.key", "kubernetes.io/tls", "cannot be parsed"),
        ("garbage", "ec.key", "kubernetes.io/tls", "no PEM certificate"),
        ("ec.crt", "garbage", "kubernetes.io/tls", "no PEM private key"),
        ("ec.crt", "encrypted", "kubernetes.io/tls", "ENCRYPTED PRIVATE KEY"),
        ("ec.key", "ec.key", "kubernetes.io/tls", "expected certificates only"),
        ("ec.crt", "ec.key", "Opaque", "is of type Opaque"),
        ("ec.crt", "ec.key", None, "has no type"),
        ("empty", "ec.key", "kubernetes.io/tls", "must contain tls.crt and tls.key"),
        ("unclosed", "ec.key", "kubernetes.io/tls", "no PEM certificate"),
        ("ec.crt", "unclosed", "kubernetes.io/tls", "no PEM private key"),
    ],
)
def test_a_bad_certificate_leaves_the_listener_out(
    pems: dict[str, bytes], crt: str, key: str, kind: str | None, says: str
) -> None:
    made = {
        "future": _future(pems["ec.crt"]),
        "truncated": _truncated(pems["ec.crt"]),
        "past-the-end": _length_past_the_end(pems["ec.crt"]),
        "garbage": b"not a certificate at all\n",
        "empty": b"",
        # 100 000 BEGIN lines and no END: one pass, not one scan per line (a regex would take hours)
        "unclosed": b"-----BEGIN CERTIFICATE-----\n" * 100_000,
        "encrypted": b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    }
    found = _decide(
        [{"name": "s"}], _secret("s", made.get(crt, pems.get(crt, b"")), made.get(key, pems.get(key, b"")), kind=kind)
    )
    assert not found.programmed and found.reason == "InvalidCertificateRef"
    assert says in found.problems[0]


def test_some_good_some_bad_serves_the_good(pems: dict[str, bytes]) -> None:
    found = _decide(
        [{"name": "gone"}, {"name": "ec"}, {"name": "ec", "kind": "ConfigMap"}],
        _secret("ec", pems["ec.crt"], pems["ec.key"]),
    )
    assert found.reason == "PartiallyInvalidCertificateRef" and len(found.pairs) == 1
    assert [p.split(":")[0] for p in found.problems] == ["certificateRefs[0]", "certificateRefs[2]"]


GATEWAY_GRANT = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "default"}


def _grant(source: dict[str, Any], target: dict[str, Any]) -> str:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "g", "namespace": "certs"},
        "spec": {"from": [source], "to": [target]},
    }
    return "---\n" + yaml.safe_dump(doc)


@pytest.mark.parametrize(
    ("grant", "reason"),
    [
        ("", "RefNotPermitted"),
        (_grant(GATEWAY_GRANT, {"group": "", "kind": "Secret"}), ""),
        (_grant(GATEWAY_GRANT, {"group": "", "kind": "Secret", "name": "ec"}), ""),
        (_grant(GATEWAY_GRANT, {"group": "", "kind": "Secret", "name": "other"}), "RefNotPermitted"),
        (_grant({**GATEWAY_GRANT, "kind": "HTTPRoute"}, {"group": "", "kind": "Secret"}), "RefNotPermitted"),
        (_grant(GATEWAY_GRANT, {"group": "", "kind": "ConfigMap"}), "RefNotPermitted"),
    ],
)
def test_a_certificate_in_another_namespace_needs_a_grant(pems: dict[str, bytes], grant: str, reason: str) -> None:
    found = _decide(
        [{"name": "ec", "namespace": "certs"}], _secret("ec", pems["ec.crt"], pems["ec.key"], "certs") + grant
    )
    assert found.reason == reason and found.programmed == (reason == "")


def test_a_listener_without_certificates_is_not_served_the_rest_is(
    pems: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = GATEWAY.replace("REFS", "[{name: ec}]") + _secret("ec", pems["old.crt"], pems["ec.key"])
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with caplog.at_level(logging.WARNING):
        bootstrap = render_bootstrap([path], RenderOptions(ephemeral_ports=True))
    names = [listener["name"] for listener in bootstrap["static_resources"]["listeners"]]
    assert names == ["default/eg/http"]  # no filter chain could serve HTTPS without its certificate
    assert any("'https' is not served" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_a_listener_left_out_takes_no_sni_from_its_twin(pems: dict[str, bytes], tmp_path: Path) -> None:
    """Two HTTPS listeners on one port and hostname: the one whose certificate does not load does not clash."""
    text = (
        GATEWAY.replace("REFS", "[{name: gone}]").replace(
            "      port: 443\n", "      port: 443\n      hostname: a.example.com\n"
        )
        + "    - {name: twin, protocol: HTTPS, port: 443, hostname: a.example.com,"
        + " tls: {certificateRefs: [{name: ec}]}}\n"
        + _secret("ec", pems["ec.crt"], pems["ec.key"])
    )
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    bootstrap = render_bootstrap([path], RenderOptions(ephemeral_ports=True))
    chains = [c["name"] for li in bootstrap["static_resources"]["listeners"] for c in li["filter_chains"]]
    assert "default/eg/twin" in chains and "default/eg/https" not in chains


def test_two_served_listeners_on_one_port_and_hostname_are_both_refused(pems: dict[str, bytes], tmp_path: Path) -> None:
    """EG: HostnameConflict on both, no winner; the rest of the Gateway is served."""
    text = (
        GATEWAY.replace("REFS", "[{name: ec}]")
        + "    - {name: twin, protocol: HTTPS, port: 443, tls: {certificateRefs: [{name: ec}]}}\n"
        + _secret("ec", pems["ec.crt"], pems["ec.key"])
    )
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    bootstrap = render_bootstrap([path], RenderOptions(ephemeral_ports=True))
    assert [listener["name"] for listener in bootstrap["static_resources"]["listeners"]] == ["default/eg/http"]


_WATCH: list[list[str]] = []  # while a test watches: the paths opened for writing


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _WATCH and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writing = (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & 0o3
        if writing:
            _WATCH[0].append(str(args[0]))


def test_the_key_check_writes_no_file(pems: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    big_chain = pems["rsa.crt"] * 60  # a long chain (past 64 KiB)
    sys.addaudithook(_audit)  # every file Python opens for writing (a hook stays: it checks _WATCH)
    opened: list[str] = []
    _WATCH.append(opened)
    try:
        found = _decide(
            [{"name": "rsa"}, {"name": "ec"}, {"name": "swapped"}],
            _secret("rsa", big_chain, pems["rsa.key"])
            + _secret("ec", pems["ec.crt"], pems["ec.key"])
            + _secret("swapped", pems["rsa.crt"], pems["ec.key"]),
        )
    finally:
        _WATCH.clear()
    assert len(found.pairs) == 2
    assert any("not a usable pair" in problem for problem in found.problems)
    assert opened == []  # no key (nor certificate) was written to any file
    assert list(scratch.iterdir()) == []


def test_a_secret_is_checked_once_per_render_however_many_refs_and_asks(
    pems: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading a chain into OpenSSL is the costly part (0.6 s for a 5 MB chain): validation and the listener
    builder both ask, and eight refs to one Secret are one check, not sixteen."""
    from sidecar.translate import certificates

    checks: list[str] = []
    real = certificates._checked_pair

    def counted(where: str, chain: bytes, key: bytes) -> tuple[str, str]:
        checks.append(where)
        return real(where, chain, key)

    monkeypatch.setattr(certificates, "_checked_pair", counted)
    text = GATEWAY.replace("REFS", yaml.safe_dump([{"name": "ec"}] * 8, default_flow_style=True).strip())
    resources = ResourceSet(
        parse_document(d, f"in#{i}")
        for i, d in enumerate(yaml.safe_load_all(text + _secret("ec", pems["ec.crt"], pems["ec.key"])))
        if d
    )
    gateway = resources.get("Gateway", "default", "eg")
    assert gateway is not None
    first = listener_certificates(resources, gateway, gateway.spec["listeners"][1])
    again = listener_certificates(resources, gateway, gateway.spec["listeners"][1])
    assert first is again and len(first.pairs) == 8
    assert checks == ["Secret default/ec"]
