"""What a render means, compared with the `xdsIR` EG derived for the same corpus case.

Both sides are reduced to the same plain facts, per EG IR route (by name) and per IR HTTP listener:

* destination (HTTPRoute; Backend when a Backend is among them): a direct response and its status, a
  redirect, or the weighted shares: each share's weight and endpoints (a Service as its clusterIP and
  port, since outside Kubernetes that is where it is reached), and the unresolved weight answering 500;
* the priority of each share (1 for a fallback Backend);
* upstream TLS per share (BackendTLSPolicy): SNI, the SANs the certificate must carry, the CA (the PEM, or
  the system store);
* authorization (SecurityPolicy): allowed or denied, for addresses in and around every CIDR named;
* load balancing (BackendTrafficPolicy): the policy and the hash (source IP, header, cookie);
* extensions (EnvoyExtensionPolicy): the ext_proc filters on the route with failOpen, the Wasm filters with
  failOpen and the module's sha256;
* client IP detection (ClientTrafficPolicy): what the HTTP connection manager is told, as EG's listener
  writes it from the IR (use_remote_address, the detection extension and its settings).

Filter order is not in the IR (EG applies it when writing xDS); it is checked against EG's xDS elsewhere.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sidecar.translate.resources import Resource

Facts = Any

INVALID = "invalid-backend-cluster"
_DEFAULT_LB = (("LEAST_REQUEST",), ())  # EG's when no BackendTrafficPolicy says otherwise


@dataclass(frozen=True)
class Check:
    feature: str  # the resource kind whose semantics this is
    what: str  # e.g. "route httproute/default/r/rule/0/match/0/* destination"
    eg: Facts
    ours: Facts

    @property
    def same(self) -> bool:
        return bool(self.eg == self.ours)


# ---- our bootstrap ---------------------------------------------------------------------------------


class Ours:
    def __init__(self, bootstrap: dict[str, Any]) -> None:
        static = bootstrap.get("static_resources") or {}
        self.clusters = {c["name"]: c for c in static.get("clusters") or []}
        self.routes: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # name -> (route, hcm)
        self.hcms: dict[str, dict[str, Any]] = {}  # filter chain name -> hcm
        self.tls_chains: list[str] = []  # filter chains that terminate TLS
        for listener in static.get("listeners") or []:
            for chain in listener.get("filter_chains") or []:
                hcm = chain["filters"][0]["typed_config"]
                self.hcms[chain.get("name", listener["name"])] = hcm
                if chain.get("transport_socket"):
                    self.tls_chains.append(chain.get("name", listener["name"]))
                for vhost in (hcm.get("route_config") or {}).get("virtual_hosts") or []:
                    for route in vhost.get("routes") or []:
                        name = route["name"].replace("wildcard", "*")
                        self.routes.setdefault(name, (route, hcm))

    def shares(self, route: dict[str, Any]) -> Facts:
        if "direct_response" in route:
            return ("direct", route["direct_response"].get("status"))
        if "redirect" in route:
            return ("redirect",)
        action = route.get("route") or {}
        found: list[Any] = []
        entries = (
            [(c["name"], c.get("weight")) for c in action["weighted_clusters"]["clusters"]]
            if "weighted_clusters" in action
            else [(action.get("cluster"), None)]
        )
        for name, weight in entries:
            if name == INVALID:
                found.append(("invalid", weight))
                continue
            cluster = self.clusters.get(name) or {}
            for locality in (cluster.get("load_assignment") or {}).get("endpoints") or []:
                endpoints = [e.get("endpoint", {}).get("address", {}) for e in locality.get("lb_endpoints") or []]
                share = weight if weight is not None else locality.get("load_balancing_weight")
                if share is None:  # consistent hash: the weight rides on each endpoint
                    share = (locality.get("lb_endpoints") or [{}])[0].get("load_balancing_weight", 1)
                priority = locality.get("priority", 0)  # a fallback Backend's locality: 1
                found.append((share, frozenset(_address(a) for a in endpoints), _tls(cluster), priority))
        return ("shares", tuple(sorted(found, key=repr)))

    def lb(self, route: dict[str, Any]) -> Facts:
        action = route.get("route") or {}
        names = (
            [c["name"] for c in action["weighted_clusters"]["clusters"] if c["name"] != INVALID]
            if "weighted_clusters" in action
            else [action.get("cluster")]
        )
        policies = {str((self.clusters.get(n) or {}).get("lb_policy", "ROUND_ROBIN")) for n in names}
        hashes = tuple(sorted(_our_hash(h) for h in action.get("hash_policy") or []))
        return (tuple(sorted(policies)), hashes)

    def extensions(self, route: dict[str, Any], hcm: dict[str, Any]) -> Facts:
        filters = {f["name"]: f.get("typed_config") or {} for f in hcm.get("http_filters") or []}
        procs, wasms = [], []
        for name in route.get("typed_per_filter_config") or {}:
            kind, _, ir_name = name.partition("/")
            config = filters.get(name) or {}
            if kind == "envoy.filters.http.ext_proc":
                procs.append((ir_name, bool(config.get("failure_mode_allow", False))))
            elif kind == "envoy.filters.http.wasm":
                plugin = config.get("config") or {}
                filename = (((plugin.get("vm_config") or {}).get("code") or {}).get("local") or {}).get("filename", "")
                sha = filename.rsplit("/", 1)[-1].removesuffix(".wasm")
                wasms.append((ir_name, bool(plugin.get("fail_open", False)), sha))
        return (tuple(sorted(procs)), tuple(sorted(wasms)))

    def allowed(self, route: dict[str, Any], address: str) -> bool | None:
        rbac = (route.get("typed_per_filter_config") or {}).get("envoy.filters.http.rbac")
        if rbac is None:
            return None
        rules = (rbac.get("rbac") or {}).get("rules") or {}
        return any(
            any(_principal(p, address) for p in policy.get("principals") or [])
            for policy in (rules.get("policies") or {}).values()
        )


def _address(address: dict[str, Any]) -> Any:
    if "pipe" in address:
        return ("unix", address["pipe"]["path"])
    socket = address.get("socket_address") or {}
    return (socket.get("address"), socket.get("port_value"))


def _tls(cluster: dict[str, Any]) -> Facts:
    config = (cluster.get("transport_socket") or {}).get("typed_config")
    if not config:
        return None
    validation = (config.get("common_tls_context") or {}).get("validation_context") or {}
    trusted = validation.get("trusted_ca") or {}
    ca = None if not trusted else "system" if "filename" in trusted else _pem(trusted.get("inline_string", ""))
    sans = tuple(
        (m.get("san_type", "DNS"), (m.get("matcher") or {}).get("exact"))
        for m in validation.get("match_typed_subject_alt_names") or []
    )
    return (config.get("sni"), sans, ca)


def _pem(text: str) -> str:
    return "".join(text.split())


def _our_hash(policy: dict[str, Any]) -> Facts:
    if "connection_properties" in policy:
        return ("sourceIP",)
    if "header" in policy:
        return ("header", policy["header"].get("header_name"))
    if "cookie" in policy:
        return ("cookie", policy["cookie"].get("name"))
    return ("other", repr(sorted(policy)))


def _principal(principal: dict[str, Any], address: str) -> bool:
    if principal.get("any"):
        return True
    if "remote_ip" in principal:
        cidr = principal["remote_ip"]
        return _in(address, f"{cidr['address_prefix']}/{cidr.get('prefix_len', 0)}")
    if "or_ids" in principal:
        return any(_principal(p, address) for p in principal["or_ids"].get("ids") or [])
    if "and_ids" in principal:
        return all(_principal(p, address) for p in principal["and_ids"].get("ids") or [])
    if "not_id" in principal:
        return not _principal(principal["not_id"], address)
    return False


def _in(address: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


# ---- EG's IR ---------------------------------------------------------------------------------------


def _eg_shares(route: dict[str, Any], services: dict[tuple[str, str], Resource]) -> Facts:
    if route.get("directResponse"):
        return ("direct", route["directResponse"].get("statusCode"))
    if route.get("redirect"):
        return ("redirect",)
    found: list[Any] = []
    invalid = 0
    for setting in (route.get("destination") or {}).get("settings") or []:
        weight = setting.get("weight", 1)
        if setting.get("invalid"):
            invalid += weight
            continue
        meta = setting.get("metadata") or {}
        if meta.get("kind") == "Service":
            service = services.get((meta.get("namespace", ""), meta.get("name", "")))
            endpoints = frozenset(_service_address(service, meta.get("sectionName")))
        else:
            endpoints = frozenset(
                ("unix", e["path"]) if e.get("path") else (e.get("host"), e.get("port"))
                for e in setting.get("endpoints") or []
            )
        found.append((weight, endpoints, _eg_tls(setting.get("tls")), setting.get("priority", 0)))
    if invalid:
        found.append(("invalid", invalid))
    return ("shares", tuple(sorted(found, key=repr)))


def _service_address(service: Resource | None, section: Any) -> Iterator[Any]:
    if service is None:
        return
    for port in service.spec.get("ports") or []:
        if str(section) in (str(port.get("name")), str(port.get("port"))):
            yield (service.spec.get("clusterIP"), port.get("port"))
            return


def _eg_tls(tls: dict[str, Any] | None) -> Facts:
    if not tls:
        return None
    sni = tls.get("sni")
    if tls.get("insecureSkipVerify"):
        return (sni, (), None)  # EG writes no validation context at all
    sans = tuple(
        ("DNS", s["hostname"]) if s.get("hostname") else ("URI", s.get("uri")) for s in tls.get("subjectAltNames") or []
    ) or ((("DNS", sni),) if sni else ())
    certificate = (tls.get("caCertificate") or {}).get("certificate")
    ca = (
        "system"
        if tls.get("useSystemTrustStore")
        else _pem(base64.b64decode(certificate).decode())
        if certificate
        else None
    )
    return (sni, sans, ca)


def _eg_lb(route: dict[str, Any]) -> Facts:
    lb = (route.get("traffic") or {}).get("loadBalancer") or {}
    policy = "LEAST_REQUEST"
    hashes: tuple[Any, ...] = ()
    if "roundRobin" in lb:
        policy = "ROUND_ROBIN"
    elif "random" in lb:
        policy = "RANDOM"
    elif "consistentHash" in lb:
        policy = "MAGLEV"
        consistent = lb["consistentHash"]
        if consistent.get("sourceIP"):
            hashes = (("sourceIP",),)
        elif consistent.get("header"):
            hashes = (("header", consistent["header"].get("name")),)
        elif consistent.get("cookie"):
            hashes = (("cookie", consistent["cookie"].get("name")),)
    return ((policy,), hashes)


def _eg_extensions(route: dict[str, Any]) -> Facts:
    ext = route.get("envoyExtensions") or {}
    procs = tuple(sorted((p["name"], bool(p.get("failOpen", False))) for p in ext.get("extProcs") or []))
    wasms = tuple(
        sorted(
            (
                w["name"],
                bool(w.get("failOpen", False)),
                (w.get("httpWasmCode") or w.get("code") or {}).get("sha256", ""),
            )
            for w in ext.get("wasms") or []
        )
    )
    return (procs, wasms)


def _eg_allowed(route: dict[str, Any], address: str) -> bool | None:
    authorization = (route.get("security") or {}).get("authorization")
    if authorization is None:
        return None
    for rule in authorization.get("rules") or []:
        cidrs = [c["cidr"] for c in (rule.get("principal") or {}).get("clientCIDRs") or []]
        if any(_in(address, c) for c in cidrs):
            return bool(rule.get("action") == "Allow")
    return bool(authorization.get("defaultAction", "Deny") == "Allow")


def _probes(route: dict[str, Any]) -> list[str]:
    """Addresses in and just around every CIDR of the route's rules, and a few far away."""
    found = ["203.0.113.9", "2001:db8:ffff::9", "10.0.0.1", "127.0.0.1"]
    for rule in ((route.get("security") or {}).get("authorization") or {}).get("rules") or []:
        for cidr in (rule.get("principal") or {}).get("clientCIDRs") or []:
            net = ipaddress.ip_network(cidr["cidr"], strict=False)
            for address in (
                net.network_address,
                net.broadcast_address,
                net.network_address - 1,
                net.broadcast_address + 1,
            ):
                if 0 <= int(address) < 2**net.max_prefixlen:
                    found.append(str(address))
    return found


def _eg_client_ip(listener: dict[str, Any]) -> Facts:
    """What EG's listener.go writes for the IR's clientIPDetection."""
    detection = listener.get("clientIPDetection") or {}
    if detection.get("customHeader"):
        header = detection["customHeader"]
        return (False, "custom_header", header.get("name"), bool(header.get("failClosed")))
    xff = detection.get("xForwardedFor")
    if xff is None:
        return (True,)
    skip = bool(xff.get("disableXForwardedForAppend"))
    if xff.get("trustedCidrs") is not None:
        cidrs = tuple(str(ipaddress.ip_network(c, strict=False)) for c in xff["trustedCidrs"])
        return (False, "xff", "cidrs", cidrs, skip)
    hops = xff.get("numTrustedHops") or 0
    return (False, "xff", "hops", max(hops - 1, 0), skip)


def _our_client_ip(hcm: dict[str, Any]) -> Facts:
    extensions = hcm.get("original_ip_detection_extensions") or []
    if not extensions:
        return (bool(hcm.get("use_remote_address", False)),)
    ext = extensions[0]["typed_config"]
    remote = bool(hcm.get("use_remote_address", False))
    if "header_name" in ext:
        return (remote, "custom_header", ext["header_name"], "reject_with_status" in ext)
    skip = bool(ext.get("skip_xff_append", False))
    if "xff_trusted_cidrs" in ext:
        cidrs = tuple(
            str(ipaddress.ip_network(f"{c['address_prefix']}/{c.get('prefix_len', 0)}", strict=False))
            for c in ext["xff_trusted_cidrs"].get("cidrs") or []
        )
        return (remote, "xff", "cidrs", cidrs, skip)
    return (remote, "xff", "hops", ext.get("xff_num_trusted_hops", 0), skip)


# ---- the comparison --------------------------------------------------------------------------------


def _sds_only(tls: dict[str, Any]) -> bool:
    certificates = tls.get("certificates") or []
    return bool(certificates) and all("sds" in certificate for certificate in certificates)


def compare(
    xds_ir: dict[str, Any],
    bootstrap: dict[str, Any],
    routes_in_scope: set[tuple[str, str]],
    features_in_scope: set[str],
    services: dict[tuple[str, str], Resource],
    gateways_in_scope: set[tuple[str, str]] | None = None,
) -> list[Check]:
    """The checks for one case: IR routes of in-scope HTTPRoutes, aspects of in-scope features only."""
    ours = Ours(bootstrap)
    checks: list[Check] = []
    for key, ir in sorted(xds_ir.items()):
        namespace, _, name = key.partition("/")
        if (namespace, name) in (gateways_in_scope or set()):
            # Which HTTPS listeners are served at all: EG leaves one out when none of its certificates loads.
            # One served only from SDS reference Secrets is out of scope: those need EG's off-by-default SDS
            # switch, which its harness turns on for a few cases; this translator is EG as installed, and
            # refuses them by name (EG's own sds-listener-disabled case is the comparison).
            listeners = [li for li in (ir or {}).get("http") or [] if li.get("tls")]
            sds_only = {li["name"] for li in listeners if _sds_only(li["tls"])}
            eg_tls = tuple(sorted(li["name"] for li in listeners if li["name"] not in sds_only))
            our_tls = tuple(sorted(n for n in ours.tls_chains if n.startswith(f"{key}/") and n not in sds_only))
            if eg_tls or our_tls:
                checks.append(Check("Gateway", f"gateway {key} HTTPS listeners served", eg_tls, our_tls))
    # Routes served only here: a listener EG does not serve (a conflict, an unknown protocol) must not serve
    # its routes here either. Route names carry the route's namespace and name, not the listener.
    eg_routes = {
        route.get("name")
        for ir in xds_ir.values()
        for listener in (ir or {}).get("http") or []
        for route in listener.get("routes") or []
    }
    for name in sorted(ours.routes):
        parts = name.split("/")
        if parts[0] == "httproute" and (parts[1], parts[2]) in routes_in_scope and name not in eg_routes:
            checks.append(Check("HTTPRoute", f"route {name} served", False, True))
    for listener in itertools.chain.from_iterable((ir or {}).get("http") or [] for ir in xds_ir.values()):
        hcm = ours.hcms.get(listener.get("name", ""))
        if "ClientTrafficPolicy" in features_in_scope and hcm is not None:
            eg_ip, our_ip = _eg_client_ip(listener), _our_client_ip(hcm)
            if (eg_ip, our_ip) != ((True,), (True,)):  # only where some detection is configured
                checks.append(Check("ClientTrafficPolicy", f"listener {listener['name']}", eg_ip, our_ip))
        for route in listener.get("routes") or []:
            meta = route.get("metadata") or {}
            if meta.get("kind") != "HTTPRoute" or (meta.get("namespace"), meta.get("name")) not in routes_in_scope:
                continue
            name = route["name"]
            found = ours.routes.get(name)
            mine, my_hcm = found if found else ({}, {})
            where = f"route {name}"
            eg_shares, our_shares = _eg_shares(route, services), ours.shares(mine) if found else None
            checks.append(Check("HTTPRoute", f"{where} destination", _without_tls(eg_shares), _without_tls(our_shares)))
            settings = (route.get("destination") or {}).get("settings") or []
            if any((s.get("metadata") or {}).get("kind") == "Backend" for s in settings):
                checks.append(Check("Backend", f"{where} backends", _without_tls(eg_shares), _without_tls(our_shares)))
            if "BackendTLSPolicy" in features_in_scope and any(s.get("tls") for s in settings):
                checks.append(
                    Check("BackendTLSPolicy", f"{where} upstream TLS", _tls_of(eg_shares), _tls_of(our_shares))
                )
            if "SecurityPolicy" in features_in_scope and (
                route.get("security") or mine.get("typed_per_filter_config", {}).get("envoy.filters.http.rbac")
            ):
                probes = _probes(route)
                eg = tuple(_eg_allowed(route, a) for a in probes)
                checks.append(
                    Check("SecurityPolicy", f"{where} authorization", eg, tuple(ours.allowed(mine, a) for a in probes))
                )
            if "BackendTrafficPolicy" in features_in_scope and eg_shares[0] == "shares" and found:
                eg_lb, our_lb = _eg_lb(route), ours.lb(mine)
                if (eg_lb, our_lb) != (_DEFAULT_LB, _DEFAULT_LB):  # only where a policy sets something
                    checks.append(Check("BackendTrafficPolicy", f"{where} load balancing", eg_lb, our_lb))
            if "EnvoyExtensionPolicy" in features_in_scope and (route.get("envoyExtensions") or found):
                eg_ext = _eg_extensions(route)
                our_ext = ours.extensions(mine, my_hcm) if found else ((), ())
                if eg_ext != ((), ()) or our_ext != ((), ()):
                    checks.append(Check("EnvoyExtensionPolicy", f"{where} extensions", eg_ext, our_ext))
    return checks


def _without_tls(shares: Facts) -> Facts:
    if not shares or shares[0] != "shares":
        return shares
    return ("shares", tuple(s[:2] for s in shares[1]))


def _tls_of(shares: Facts) -> Facts:
    if not shares or shares[0] != "shares":
        return shares
    return tuple(sorted(repr(s[2]) for s in shares[1] if len(s) > 2))
