"""Which of a Gateway's listeners EG serves, and why not the others (EG v1.9.0 listener.go, validate.go).

EG keeps a Gateway whose listeners conflict and refuses only those listeners; the others are served. In
EG's order, for the listeners of one Gateway:

1. each listener on its own: a protocol other than HTTP, HTTPS, TLS, TCP and UDP is refused
   (Accepted=False, UnsupportedProtocol) and accepts no route; allowedRoutes.kinds naming a kind of
   another group or one the protocol does not take is refused (InvalidRouteKinds; the valid kinds still
   attach routes); tls that does not fit the protocol (on
   HTTP, TCP or UDP; missing on HTTPS or TLS; an HTTPS mode other than Terminate, UnsupportedTLSMode) and
   a hostname on TCP or UDP make it not programmed (Invalid); an HTTPS listener none of whose
   certificates load is not programmed (certificates.py). Neither takes part in the conflict checks, so a
   broken listener never takes a port or a hostname from a good one;
2. protocols per port: UDP shares a port with anything (it is another socket); HTTPS and TLS are one
   class. Two classes on one port (HTTP with HTTPS, HTTP with TCP, ...) refuse every non-UDP listener on
   the port (Conflicted, ProtocolConflict): EG picks no winner;
3. hostnames per port, among the HTTP, HTTPS and TLS listeners left: two with the same hostname (or both
   without one) are both refused (Conflicted, HostnameConflict);
4. TCP listeners per port, and UDP ones: the first is kept, each later one refused (ProtocolConflict).

A refused listener is not built: its port serves nothing of it, so its clients get no connection or no
route, never traffic it was not configured for. A conflicted listener still has routes attached (EG
accepts them; they are just not served); one with an unsupported protocol attaches none (EG:
NotAllowedByListeners). The builder logs one warning line per refused listener, naming the file, the
Gateway, the listener and its value, so a typo stays visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.translate.certificates import listener_certificates
from sidecar.translate.refs import ROUTE_KINDS, supported_route_kinds
from sidecar.translate.resources import GATEWAY_API, Resource, ResourceSet

__all__ = ["EG_PROTOCOLS", "ListenerVerdict", "listener_verdicts"]

# The listener protocols EG implements; any other name Gateway API allows is UnsupportedProtocol.
EG_PROTOCOLS = ("HTTP", "HTTPS", "TLS", "TCP", "UDP")
_LAYER4 = ("TCP", "UDP")


@dataclass(frozen=True)
class ListenerVerdict:
    """EG's decision on one listener: served, or the reason it is not and why."""

    index: int
    listener: dict[str, Any]
    reason: str = ""  # "", UnsupportedProtocol, Invalid, UnsupportedTLSMode, ProtocolConflict, HostnameConflict...
    why: str = ""
    field: str = ""  # the listener field the refusal is about: protocol, hostname, tls or tls.certificateRefs

    @property
    def served(self) -> bool:
        return not self.reason

    @property
    def accepted(self) -> bool:
        """EG's listener Accepted condition: only an unsupported protocol makes it False (a conflict is
        Conflicted=True, a certificate ResolvedRefs=False; both leave Accepted alone)."""
        return self.reason != "UnsupportedProtocol"


def listener_verdicts(resources: ResourceSet, gateway: Resource) -> list[ListenerVerdict]:
    """EG's decision on every listener of `gateway`, in spec order (decided once per render)."""
    key = ("listener-verdicts", gateway.key)
    found = resources.derived.get(key)
    if not isinstance(found, list):
        found = resources.derived[key] = _decide(resources, gateway)
    return found


def _decide(resources: ResourceSet, gateway: Resource) -> list[ListenerVerdict]:
    listeners: list[dict[str, Any]] = list(gateway.spec.get("listeners") or [])
    refused: dict[int, tuple[str, str, str]] = {}
    for index, listener in enumerate(listeners):
        protocol = listener["protocol"]
        if protocol not in EG_PROTOCOLS:
            refused[index] = (
                "UnsupportedProtocol",
                f"protocol {protocol!r} is not one of {', '.join(EG_PROTOCOLS)}",
                "protocol",
            )
        elif (kinds_problem := _kinds_problem(listener)) is not None:
            refused[index] = ("InvalidRouteKinds", kinds_problem, "allowedRoutes.kinds")
        elif (tls_problem := _tls_problem(listener)) is not None:
            refused[index] = (*tls_problem, "tls")
        elif protocol in _LAYER4 and listener.get("hostname"):
            refused[index] = ("Invalid", f"a hostname is not allowed with protocol {protocol}", "hostname")
        elif protocol == "HTTPS":
            certificates = listener_certificates(resources, gateway, listener)
            if not certificates.programmed:
                refused[index] = (
                    certificates.reason or "InvalidCertificateRef",
                    "no usable certificate",
                    "tls.certificateRefs",
                )
    # Only listeners valid on their own take part in the conflict checks.
    valid = [i for i in range(len(listeners)) if i not in refused]
    by_port: dict[int, list[int]] = {}
    for index in valid:
        by_port.setdefault(listeners[index]["port"], []).append(index)
    for port, indexes in by_port.items():
        _protocol_conflicts(gateway, listeners, port, indexes, refused)
        _hostname_conflicts(gateway, listeners, port, [i for i in indexes if i not in refused], refused)
        for protocol in _LAYER4:
            same = [i for i in indexes if listeners[i]["protocol"] == protocol and i not in refused]
            for index in same[1:]:
                refused[index] = ("ProtocolConflict", f"only one {protocol} listener is allowed on port {port}", "port")
    return [
        ListenerVerdict(index, listener, *refused.get(index, ("", "", ""))) for index, listener in enumerate(listeners)
    ]


def _kinds_problem(listener: dict[str, Any]) -> str | None:
    """Why EG refuses the listener's allowedRoutes.kinds (ResolvedRefs=False, InvalidRouteKinds): a kind of
    another group, or one its protocol does not take. The valid ones still decide what attaches."""
    wanted = (listener.get("allowedRoutes") or {}).get("kinds") or []
    valid = set(supported_route_kinds(listener))
    bad = [
        f"{GATEWAY_API if k.get('group') is None else (k['group'] or 'core')}/{k['kind']}"
        for k in wanted
        if k["kind"] not in valid or k.get("group") not in (None, GATEWAY_API)
    ]
    if not bad:
        return None
    return f"route kinds {', '.join(bad)} are not among {', '.join(ROUTE_KINDS.get(listener['protocol'], ()))}"


def _tls_problem(listener: dict[str, Any]) -> tuple[str, str] | None:
    """EG's reason and why, when the listener's tls does not fit its protocol (EG validate.go)."""
    protocol, tls = listener["protocol"], listener.get("tls")
    if protocol in ("HTTP", *_LAYER4):
        return ("Invalid", f"tls is not allowed with protocol {protocol}") if tls is not None else None
    if tls is None:
        return "Invalid", f"protocol {protocol} needs tls"
    mode, refs = tls.get("mode", "Terminate"), tls.get("certificateRefs")
    if protocol == "HTTPS" and mode != "Terminate":
        return "UnsupportedTLSMode", f"TLS mode {mode!r} is not supported with protocol HTTPS, only Terminate"
    if protocol == "TLS" and mode == "Passthrough" and refs:
        return "Invalid", "certificateRefs are not allowed with TLS mode Passthrough"
    if protocol == "TLS" and mode == "Terminate" and not refs:
        return "Invalid", "TLS mode Terminate needs certificateRefs"
    return None


def _protocol_class(listener: dict[str, Any]) -> str:
    return "HTTPS/TLS" if listener["protocol"] in ("HTTPS", "TLS") else str(listener["protocol"])


def _display(gateway: Resource, listeners: list[dict[str, Any]], indexes: list[int]) -> str:
    return ", ".join(sorted(f"{gateway.namespace}/{gateway.name}/{listeners[i]['name']}" for i in indexes))


def _protocol_conflicts(
    gateway: Resource, listeners: list[dict[str, Any]], port: int, indexes: list[int], refused: dict[int, Any]
) -> None:
    streams = [i for i in indexes if listeners[i]["protocol"] != "UDP"]
    classes = {_protocol_class(listeners[i]) for i in streams}
    if len(classes) <= 1:
        return
    why = f"port {port} mixes protocols {', '.join(sorted(classes))}; conflicting listeners: " + _display(
        gateway, listeners, streams
    )
    for index in streams:
        refused[index] = ("ProtocolConflict", why, "protocol")


def _hostname_conflicts(
    gateway: Resource, listeners: list[dict[str, Any]], port: int, indexes: list[int], refused: dict[int, Any]
) -> None:
    by_host: dict[str, list[int]] = {}
    for index in indexes:
        if listeners[index]["protocol"] not in _LAYER4:
            by_host.setdefault(str(listeners[index].get("hostname") or ""), []).append(index)
    for host, same in by_host.items():
        if len(same) < 2:
            continue
        spelled = repr(host) if host else "(none)"
        why = f"hostname {spelled} is shared by listeners on port {port}: " + _display(gateway, listeners, same)
        for index in same:
            refused[index] = ("HostnameConflict", why, "hostname")
