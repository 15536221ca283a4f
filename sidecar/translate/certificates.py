"""An HTTPS listener's certificateRefs as EG resolves them: the certificates it serves, or why it cannot.

EG keeps a Gateway whose listener certificates do not all resolve (the Gateway stays Accepted; the
listener gets ResolvedRefs=False) and leaves out what does not load. Each certificateRef, in order
(EG v1.9.0 validate.go and tls.go), with the listener reason EG reports:

* group "" and kind Secret (InvalidCertificateRef);
* a Secret in another namespace needs a ReferenceGrant there allowing Gateways of the listener's
  namespace (RefNotPermitted);
* the Secret exists, is of type `kubernetes.io/tls` (an SDS reference Secret needs EG's SDS switch, off by
  default and not implemented here) and has non-empty `tls.crt` and `tls.key` (InvalidCertificateRef);
* `tls.crt` is a PEM chain whose every certificate parses and is valid now, `tls.key` holds a PKCS#1,
  PKCS#8 or EC private key (the first such block), and the key is the leaf's (InvalidCertificateRef).

When nothing loads, the listener is not programmed: no Envoy filter chain serves it, so its clients get
no TLS handshake, never a connection without the certificate (reason RefNotPermitted if every failure was
one, else InvalidCertificateRef). When some load, the listener serves those
(PartiallyInvalidCertificateRef). A listener without certificateRefs is not programmed either.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sidecar.translate.grants import reference_permitted
from sidecar.translate.refs import secret_value
from sidecar.translate.resources import Resource, ResourceSet

__all__ = ["ListenerCertificates", "gateway_listener_reasons", "listener_certificates"]

TLS_SECRET_TYPE = "kubernetes.io/tls"
_KEY_BLOCKS = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")


@dataclass(frozen=True)
class ListenerCertificates:
    """What an HTTPS listener serves: (chain, key) pairs, and EG's ResolvedRefs reason when not all load."""

    pairs: tuple[tuple[str, str], ...]
    reason: str = ""  # "", RefNotPermitted, InvalidCertificateRef or PartiallyInvalidCertificateRef
    problems: tuple[str, ...] = ()

    @property
    def programmed(self) -> bool:
        return bool(self.pairs)


class _Refused(Exception):
    def __init__(self, message: str, reason: str = "InvalidCertificateRef") -> None:
        super().__init__(message)
        self.reason = reason


def listener_certificates(resources: ResourceSet, gateway: Resource, listener: dict[str, Any]) -> ListenerCertificates:
    """EG's decision on the certificateRefs of one HTTPS listener of `gateway` (decided once per render:
    validation and the listener builder both ask)."""
    key = ("listener-certificates", gateway.key, str(listener.get("name")))
    found = resources.derived.get(key)
    if not isinstance(found, ListenerCertificates):
        found = resources.derived[key] = _decide(resources, gateway, listener)
    return found


def _decide(resources: ResourceSet, gateway: Resource, listener: dict[str, Any]) -> ListenerCertificates:
    refs = (listener.get("tls") or {}).get("certificateRefs") or []
    pairs: list[tuple[str, str]] = []
    problems: list[str] = []
    reasons: list[str] = []
    for index, ref in enumerate(refs):
        try:
            pairs.append(_load(resources, gateway, ref))
        except _Refused as refused:
            problems.append(f"certificateRefs[{index}]: {refused}")
            reasons.append(refused.reason)
    if not problems:
        return ListenerCertificates(tuple(pairs))
    if pairs:
        return ListenerCertificates(tuple(pairs), "PartiallyInvalidCertificateRef", tuple(problems))
    reason = "RefNotPermitted" if all(r == "RefNotPermitted" for r in reasons) else "InvalidCertificateRef"
    return ListenerCertificates((), reason, tuple(problems))


def gateway_listener_reasons(resources: ResourceSet, gateway: Resource) -> list[tuple[str, ListenerCertificates]]:
    """(listener name, its certificates) for each HTTPS listener of `gateway` that does not load them all."""
    found = []
    for listener in gateway.spec.get("listeners") or []:
        if listener.get("protocol") == "HTTPS":
            certificates = listener_certificates(resources, gateway, listener)
            if certificates.problems or not certificates.programmed:
                found.append((str(listener["name"]), certificates))
    return found


def _load(resources: ResourceSet, gateway: Resource, ref: dict[str, Any]) -> tuple[str, str]:
    if ref.get("group", "") != "" or ref.get("kind", "Secret") != "Secret":
        raise _Refused(f"expected a core Secret, got {ref.get('group', '')}/{ref.get('kind')}")
    namespace = ref.get("namespace", gateway.namespace)
    name = ref["name"]
    if not reference_permitted(resources, gateway, "", "Secret", namespace, name):
        raise _Refused(
            f"Secret {namespace}/{name} is in another namespace and no ReferenceGrant there allows it "
            f"from Gateways of namespace {gateway.namespace}",
            "RefNotPermitted",
        )
    secret = resources.get("Secret", namespace, name)
    if secret is None:
        raise _Refused(f"Secret {namespace}/{name} does not exist")
    kind = secret.data.get("type")
    if kind != TLS_SECRET_TYPE:
        got = f"is of type {kind}" if kind else "has no type (Kubernetes makes that Opaque)"
        raise _Refused(f"Secret {namespace}/{name} {got}; a listener certificate needs type {TLS_SECRET_TYPE}")
    try:
        chain, key = secret_value(secret, "tls.crt"), secret_value(secret, "tls.key")
    except Exception as exc:  # a data value that is not base64: the Secret is unusable, as in EG
        raise _Refused(f"Secret {namespace}/{name}: {exc}") from None
    if not chain or not key:
        raise _Refused(f"Secret {namespace}/{name} must contain tls.crt and tls.key")
    # Checked once per Secret and render, however many listeners and refs name it (a check loads the
    # whole chain into OpenSSL).
    memo = ("certificate-pair", namespace, name)
    checked = resources.derived.get(memo)
    if checked is None:
        try:
            checked = _checked_pair(f"Secret {namespace}/{name}", chain, key)
        except _Refused as refused:
            checked = refused
        resources.derived[memo] = checked
    if isinstance(checked, _Refused):
        raise checked
    return checked  # type: ignore[return-value]


def _checked_pair(where: str, chain: bytes, key: bytes) -> tuple[str, str]:
    """The chain (every certificate valid now) and the key block, checked to belong together."""
    certificates = [(kind, body) for kind, body in _blocks(chain)]
    if not certificates:
        raise _Refused(f"{where}: no PEM certificate in tls.crt")
    now = datetime.datetime.now(datetime.UTC)
    for kind, der in certificates:
        if kind != "CERTIFICATE":
            raise _Refused(f"{where}: tls.crt holds a {kind} block, expected certificates only")
        not_before, not_after = _validity(where, der)
        if now < not_before:
            raise _Refused(f"{where}: a certificate in tls.crt is valid only from {not_before:%Y-%m-%d %H:%M:%S}Z")
        if now > not_after:
            raise _Refused(f"{where}: a certificate in tls.crt expired at {not_after:%Y-%m-%d %H:%M:%S}Z")
    keys = list(_blocks(key))
    block = next((b for b in keys if b[0] in _KEY_BLOCKS), keys[0] if keys else None)
    if block is None:
        raise _Refused(f"{where}: no PEM private key in tls.key")
    if block[0] not in _KEY_BLOCKS:
        raise _Refused(f"{where}: tls.key holds a {block[0]} block; expected a PKCS#1, PKCS#8 or EC private key")
    chain_pem = "".join(_pem(kind, der) for kind, der in certificates)
    key_pem = _pem(*block)
    _check_key_matches(where, chain_pem, key_pem)
    return chain_pem, key_pem


def _blocks(data: bytes) -> list[tuple[str, bytes]]:
    """The PEM blocks of `data` in order, in one pass (a hostile Secret of many unclosed BEGIN lines cannot
    make this quadratic): like Go's pem.Decode, a block without its END line, or with a body that is not
    base64, ends the list."""
    found = []
    position = 0
    while (start := data.find(b"-----BEGIN ", position)) != -1:
        label_end = data.find(b"-----", start + 11)
        if label_end == -1:
            break
        label = data[start + 11 : label_end]
        end_marker = b"-----END " + label + b"-----"
        body_start = label_end + 5
        end = data.find(end_marker, body_start)
        if end == -1 or not label or b"\n" in label:
            break
        try:
            body = base64.b64decode(b"".join(data[body_start:end].split()), validate=True)
        except (binascii.Error, ValueError):
            break
        found.append((label.decode("ascii", errors="replace"), body))
        position = end + len(end_marker)
    return found


def _pem(kind: str, der: bytes) -> str:
    text = base64.b64encode(der).decode()
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {kind}-----\n{lines}\n-----END {kind}-----\n"


def _check_key_matches(where: str, chain_pem: str, key_pem: str) -> None:
    """OpenSSL parses the chain and the key and checks that the key is the leaf certificate's. Both reach
    it as in-memory files, never a file on disk: a private key is not written anywhere, not even to a
    private temporary directory."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _in_memory(chain_pem.encode()) as cert_file, _in_memory(key_pem.encode()) as key_file:
        try:
            context.load_cert_chain(cert_file, key_file, password=_NO_PASSWORD)
        except ssl.SSLError as exc:
            mismatch = "mismatch" in str(exc).lower()
            problem = "private key does not match the certificate" if mismatch else exc.reason or exc.library or exc
            raise _Refused(f"{where}: tls.crt and tls.key are not a usable pair: {problem}") from None


def _NO_PASSWORD() -> bytes:
    # An encrypted key (unreachable: _blocks refuses one) fails to decrypt; OpenSSL never prompts a terminal.
    return b""


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path (/dev/fd/N) OpenSSL reads `data` from: an anonymous in-memory file (memfd), which has no
    name in any file system and is gone when closed. Seekable, unlike a pipe (OpenSSL seeks in a key)."""
    fd = os.memfd_create("sidecar-certificate", os.MFD_CLOEXEC)
    try:
        written = 0
        while written < len(data):  # a write may be short
            written += os.write(fd, memoryview(data)[written:])
        yield f"/dev/fd/{fd}"
    finally:
        os.close(fd)


# ---- the validity period of a DER certificate (Certificate -> tbsCertificate -> validity) ---------


def _validity(where: str, der: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    try:
        _, start, _ = _tlv(der, 0, 0x30)  # Certificate
        _, pos, _ = _tlv(der, start, 0x30)  # tbsCertificate
        if der[pos] == 0xA0:  # [0] version
            pos = _tlv(der, pos, 0xA0)[2]
        pos = _tlv(der, pos, 0x02)[2]  # serialNumber
        pos = _tlv(der, pos, 0x30)[2]  # signature
        pos = _tlv(der, pos, 0x30)[2]  # issuer
        _, inner, _ = _tlv(der, pos, 0x30)  # validity
        times = []
        for _ in range(2):
            tag, body, inner = _tlv(der, inner, None)
            times.append(_time(tag, der[body:inner]))
        return times[0], times[1]
    except (IndexError, ValueError):
        raise _Refused(f"{where}: a certificate in tls.crt cannot be parsed") from None


def _tlv(der: bytes, pos: int, want: int | None) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at `pos`."""
    tag = der[pos]
    if want is not None and tag != want:
        raise ValueError(f"tag {tag:#x}, expected {want:#x}")
    length = der[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    end = start + length
    if end > len(der):
        raise ValueError("truncated")
    return tag, start, end


def _time(tag: int, text: bytes) -> datetime.datetime:
    value = text.decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049
        parsed = datetime.datetime.strptime(value, "%y%m%d%H%M%SZ")
        if parsed.year >= 2050:
            parsed = parsed.replace(year=parsed.year - 100)
    elif tag == 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        parsed = datetime.datetime.strptime(value, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError("not a time")
    return parsed.replace(tzinfo=datetime.UTC)
