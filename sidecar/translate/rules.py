"""Cross-resource validation rules: what EG's translator checks beyond each resource's own schema.

`validate(resources)` raises ConfigError at the first problem, naming file, resource, field and what was
expected. It runs in two passes: every resource's structure on its own (schema.py), then the rules here,
one method per kind: targetRefs resolve, backendRefs resolve (with a port where a Service needs one;
refs.py follows them), Backend endpoints are well formed and not mixed in ways EG refuses,
Secrets/ConfigMaps exist and hold the expected keys, CIDRs parse, consistent-hash table sizes are prime,
filterOrder does not place a filter relative to itself.

`strict_eg=True` also applies the rules that only make sense inside a cluster (EG refuses loopback
Backend addresses, single-label FQDNs); the local runtime needs loopback, so it
is off for `render`/`up`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterator
from typing import Any

from sidecar.errors import ConfigError
from sidecar.translate.attachment import CLAIMING_KINDS, conflicts
from sidecar.translate.listeners import listener_verdicts
from sidecar.translate.messages import parse_duration
from sidecar.translate.refs import (
    backend_ref_target,
    endpoint_kinds,
    listener_accepts,
    policy_targets,
    secret_ref,
    supported_route_kinds,
    unreferenced_proxies,
)
from sidecar.translate.regex import regex_error
from sidecar.translate.resources import EG_API, GATEWAY_API, Resource, ResourceSet, eg_default_reason
from sidecar.translate.schema import HOSTNAME, check_structure

__all__ = ["dropped_rules", "failed_rules", "validate"]

# ---- the rules: one method per kind ---------------------------------------------------------------


class _Checker:
    def __init__(self, resources: ResourceSet, strict_eg: bool) -> None:
        self.resources = resources
        self.strict_eg = strict_eg

    def run(self) -> None:
        for res in self.resources:
            with _eg_reason(res):
                check_structure(res)
        for res in self.resources:
            check = getattr(self, "_" + res.kind, None)
            if check is not None:
                with _eg_reason(res):
                    check(res)
        for kind in CLAIMING_KINDS:
            for key, (path, older) in conflicts(self.resources.of(kind)).items():
                policy = self.resources.get(*key)
                assert policy is not None
                raise _with_reason(
                    policy.error(
                        path,
                        f"conflicts with {kind} {older.namespace}/{older.name}, which targets the same "
                        "resource (and section) and is older; EG keeps the older one and rejects this one "
                        "(Conflicted): merge them or target different resources",
                    ),
                    "Conflicted",
                )
        unreferenced = unreferenced_proxies(self.resources)
        if len(unreferenced) > 1:
            raise unreferenced[1].error(
                "metadata.name",
                "more than one EnvoyProxy with a filterOrder is not "
                "referenced by a Gateway's spec.infrastructure.parametersRef; "
                "reference each from its Gateway",
            )

    def _Gateway(self, res: Resource) -> None:
        names: set[str] = set()
        for index, listener in enumerate(res.spec["listeners"]):
            path = f"spec.listeners[{index}]"
            if listener["name"] in names:
                raise res.error(f"{path}.name", f"duplicate listener name {listener['name']!r}")
            names.add(listener["name"])
        # Certificates that do not load, protocols EG does not know and listeners that conflict are EG's
        # decision per listener, not an input error: the others are served (listeners.py). What EG would
        # serve and this translator does not implement is refused as unsupported.
        for verdict in listener_verdicts(self.resources, res):
            protocol = verdict.listener["protocol"]
            if verdict.served and protocol not in ("HTTP", "HTTPS"):
                raise res.error(
                    f"spec.listeners[{verdict.index}].protocol",
                    f"unsupported value {protocol!r} (this translator implements HTTP and HTTPS listeners)",
                )
        # A parametersRef that names no EnvoyProxy is not an error in EG: the Gateway gets the GatewayClass's
        # settings or the defaults (refs.gateway_envoy_proxy); the builder warns.

    def _HTTPRoute(self, res: Resource) -> None:
        for index, parent in enumerate(res.spec.get("parentRefs") or []):
            path = f"spec.parentRefs[{index}]"
            if (parent.get("group", GATEWAY_API), parent.get("kind", "Gateway")) != (GATEWAY_API, "Gateway"):
                raise res.error(path, "expected a Gateway parent (group gateway.networking.k8s.io)")
            namespace = parent.get("namespace", res.namespace)
            gateway = self.resources.get("Gateway", namespace, parent["name"])
            if gateway is None:
                raise res.error(f"{path}.name", f"no Gateway {namespace}/{parent['name']} in the input files")
            section = parent.get("sectionName")
            if section and section not in {li["name"] for li in gateway.spec["listeners"]}:
                raise _with_reason(
                    res.error(
                        f"{path}.sectionName", f"Gateway {namespace}/{parent['name']} has no listener named {section!r}"
                    ),
                    "NoMatchingParent",
                )
            if not any(listener_accepts(gateway, li, res, parent) for li in gateway.spec["listeners"]):
                raise _with_reason(
                    res.error(
                        path,
                        f"no listener of Gateway {namespace}/{parent['name']} accepts this route "
                        "(check sectionName, port, the listeners' protocol and hostname against spec.hostnames, "
                        "and allowedRoutes.namespaces)" + self._refused_listeners(gateway),
                    ),
                    _unmatched_reason(gateway, res, parent),
                )
        for r, rule in enumerate(res.spec.get("rules") or []):
            refs = rule.get("backendRefs") or []
            # backendRefs that do not resolve are EG's decision, not an input error: the builder answers 500
            # for their share (backendrefs.py); backends one cluster cannot hold get a cluster each (routes.py).
            filters = rule.get("filters") or []
            for f, flt in enumerate(filters):
                field = flt["type"][0].lower() + flt["type"][1:] if flt["type"] != "URLRewrite" else "urlRewrite"
                if flt.get(field) is None:
                    raise res.error(f"spec.rules[{r}].filters[{f}].{field}", f"required for type {flt['type']}")
            if any(f["type"] == "RequestRedirect" for f in filters) and refs:
                raise res.error(f"spec.rules[{r}]", "a RequestRedirect rule cannot also have backendRefs")
            for m, match in enumerate(rule.get("matches") or []):
                pmatch = match.get("path") or {}
                is_regex = pmatch.get("type") == "RegularExpression"
                if not is_regex and not pmatch.get("value", "/").startswith("/"):
                    raise res.error(f"spec.rules[{r}].matches[{m}].path.value", "expected a path starting with '/'")
        # A rule EG cannot process is dropped (PartiallyInvalid) and the route keeps its other rules; the route
        # is refused only when every rule is dropped (EG route.go processHTTPRouteParentRefs).
        # A rule whose filters EG cannot apply answers 500 instead; again the route is refused only when
        # every rule failed one way or the other.
        failed = {**failed_rules(res), **dropped_rules(res)}
        if failed and len(failed) == len(res.spec.get("rules") or []):
            raise _with_reason(failed[min(failed)], "UnsupportedValue")

    def _refused_listeners(self, gateway: Resource) -> str:
        """Why EG refuses the Gateway's listeners that it does, so a route left without one says so."""
        return "".join(
            f"; {gateway.where(f'spec.listeners[{v.index}].{v.field}')}: {v.why} (EG: {v.reason})"
            for v in listener_verdicts(self.resources, gateway)
            if not v.served
        )

    def _Backend(self, res: Resource) -> None:
        # EG 1.9 accepts any mix of address types in a Backend (its cluster resolves names, and takes IP
        # literals as they are); unix sockets only serve extProc, which refuses them beside names (below).
        for index, endpoint in enumerate(res.spec["endpoints"]):
            path = f"spec.endpoints[{index}]"
            if endpoint.get("ip") is not None:
                try:
                    address = ipaddress.ip_address(endpoint["ip"]["address"])
                except ValueError:
                    raise res.error(
                        f"{path}.ip.address", f"expected an IPv4 or IPv6 address, got {endpoint['ip']['address']!r}"
                    ) from None
                if self.strict_eg and address.is_loopback:
                    raise res.error(f"{path}.ip.address", f"{address} is a loopback address, which EG refuses")
            elif endpoint.get("fqdn") is not None:
                host = endpoint["fqdn"]["hostname"]
                name = host.removesuffix(".")  # EG (and its CRD) take a fully qualified name's trailing dot
                if not HOSTNAME.pattern.fullmatch(name) or name.startswith("*"):  # type: ignore[union-attr]
                    raise res.error(f"{path}.fqdn.hostname", f"expected a DNS name, got {host!r}")
                with contextlib.suppress(ValueError):
                    ipaddress.ip_address(name)
                    raise res.error(
                        f"{path}.fqdn.hostname", f"{host!r} is an IP address (EG refuses it here): use an ip endpoint"
                    )
                if "." not in host and self.strict_eg:  # EG allows single labels only running on a host
                    raise res.error(
                        f"{path}.fqdn.hostname",
                        f"expected a domain of two or more labels (EG refuses single-label names), got {host!r}",
                    )
            elif not endpoint["unix"]["path"].startswith("/"):
                raise res.error(f"{path}.unix.path", f"expected an absolute path, got {endpoint['unix']['path']!r}")
        self._backend_tls(res)

    def _backend_tls(self, res: Resource) -> None:
        """EG's rule: TLS that verifies needs a CA, from the Backend itself or from BackendTLSPolicies (one on
        the whole Backend with a CA, or one sectioned on every endpoint port). EG matches policies to the
        Backend by name only; a policy in another namespace never applies, so routes through it answer 500."""
        tls = res.spec.get("tls")
        sources = ("insecureSkipVerify", "wellKnownCACertificates", "caCertificateRefs")
        if tls is None or any(tls.get(k) for k in sources):
            return
        addresses = [e.get("ip") or e.get("fqdn") for e in res.spec["endpoints"]]
        ports = {str(a["port"]) for a in addresses if a}
        sectioned: set[str] = set()
        for policy in self.resources.of("BackendTLSPolicy"):
            validation = policy.spec.get("validation") or {}
            for ref in policy.spec.get("targetRefs") or []:
                if (ref.get("group"), ref.get("kind"), ref.get("name")) != (EG_API, "Backend", res.name):
                    continue
                if ref.get("sectionName") is None:
                    if validation.get("wellKnownCACertificates") or validation.get("caCertificateRefs"):
                        return
                else:
                    sectioned.add(str(ref["sectionName"]))
        if not ports or not ports <= sectioned:
            raise res.error(
                "spec.tls",
                "a CA is required unless insecureSkipVerify is true: set caCertificateRefs or wellKnownCACertificates "
                "(or attach a BackendTLSPolicy with one)",
            )

    def _Service(self, res: Resource) -> None:
        if res.spec.get("type") == "ExternalName" and not res.spec.get("externalName"):
            raise res.error("spec.externalName", "required with type ExternalName")
        cluster_ip = res.spec.get("clusterIP")
        if cluster_ip not in (None, "", "None"):
            try:
                ipaddress.ip_address(cluster_ip)
            except ValueError:
                raise res.error("spec.clusterIP", f"expected an IP address or None, got {cluster_ip!r}") from None

    def _BackendTLSPolicy(self, res: Resource) -> None:
        for path, ref in policy_targets(res):
            kind = ref["kind"]
            group = ref.get("group", "")
            if kind == "ServiceImport":
                raise res.error(
                    f"{path}.kind", "unsupported value 'ServiceImport' (this translator implements Backend and Service)"
                )
            if (group, kind) not in ((EG_API, "Backend"), ("", "Service")):
                raise res.error(path, f"expected a Backend (group {EG_API}) or a Service, got {group}/{kind}")
            if self.resources.get(kind, res.namespace, ref["name"]) is None:
                raise res.error(f"{path}.name", f"no {kind} {res.namespace}/{ref['name']} in the input files")
        validation = res.spec["validation"]
        refs = validation.get("caCertificateRefs") or []
        if bool(refs) == bool(validation.get("wellKnownCACertificates")):
            raise res.error("spec.validation", "expected exactly one of caCertificateRefs or wellKnownCACertificates")
        for index, san in enumerate(validation.get("subjectAltNames") or []):
            wanted, other = ("hostname", "uri") if san["type"] == "Hostname" else ("uri", "hostname")
            if not san.get(wanted):
                raise res.error(
                    f"spec.validation.subjectAltNames[{index}].{wanted}", f"required with type {san['type']}"
                )
            if san.get(other):
                raise res.error(
                    f"spec.validation.subjectAltNames[{index}].{other}", f"not allowed with type {san['type']}"
                )
        for index, ref in enumerate(refs):
            if ref.get("kind") == "ClusterTrustBundle":
                raise res.error(
                    f"spec.validation.caCertificateRefs[{index}].kind",
                    "unsupported value 'ClusterTrustBundle' (this translator loads CAs from ConfigMaps and Secrets)",
                )
        # A CA that does not load is EG's decision (the policy is not accepted and the routes using it answer
        # 500; backendtls.py), not an input error.

    def _targets(self, res: Resource, kinds: tuple[str, ...]) -> None:
        targets = list(policy_targets(res))
        if not targets:
            raise res.error("spec", "expected exactly one of targetRef or targetRefs")
        if "targetRef" in res.spec and "targetRefs" in res.spec:
            raise res.error("spec", "expected exactly one of targetRef or targetRefs, got both")
        for path, ref in targets:
            if ref["group"] != GATEWAY_API:
                raise res.error(
                    f"{path}.group", f"expected {GATEWAY_API} (EG's CRD allows no other), got {ref['group']!r}"
                )
            if ref["kind"] in _EG_TARGET_KINDS and ref["kind"] not in kinds:
                raise res.error(
                    f"{path}.kind",
                    f"unsupported value {ref['kind']!r} (this translator implements {' and '.join(kinds)} targets)",
                )
            if ref["kind"] not in kinds:
                raise res.error(
                    path,
                    f"expected group {GATEWAY_API} and kind {' or '.join(kinds)}, got {ref['group']}/{ref['kind']}",
                )
            target = self.resources.get(ref["kind"], res.namespace, ref["name"])
            if target is None:
                raise res.error(f"{path}.name", f"no {ref['kind']} {res.namespace}/{ref['name']} in the input files")
            section = ref.get("sectionName")
            if section:
                sections = (
                    [li["name"] for li in target.spec["listeners"]]
                    if target.kind == "Gateway"
                    else [rule.get("name") for rule in target.spec.get("rules") or []]
                )
                if section not in sections:
                    raise _with_reason(
                        res.error(
                            f"{path}.sectionName",
                            f"{target.kind} {target.namespace}/{target.name} has no section named {section!r}",
                        ),
                        "TargetNotFound",
                    )

    def _EnvoyExtensionPolicy(self, res: Resource) -> None:
        self._targets(res, ("Gateway", "HTTPRoute"))
        for index, ext in enumerate(res.spec.get("extProc") or []):
            path = f"spec.extProc[{index}]"
            refs = ext["backendRefs"]
            targets = [
                backend_ref_target(self.resources, res, ref, f"{path}.backendRefs[{i}]") for i, ref in enumerate(refs)
            ]
            kinds = set().union(*(endpoint_kinds(t) for t in targets))
            if "fqdn" in kinds and len(kinds) > 1:
                raise res.error(
                    f"{path}.backendRefs",
                    "mixes FQDN endpoints with other endpoint types; EG needs one address type per extProc",
                )
            mode = ext.get("processingMode") or {}
            full_duplex = any((mode.get(d) or {}).get("body") == "FullDuplexStreamed" for d in ("request", "response"))
            if full_duplex and ext.get("failOpen"):
                raise res.error(
                    f"{path}.failOpen",
                    "expected false with body mode FullDuplexStreamed "
                    "(Envoy refuses fail-open for full-duplex streaming)",
                )
            waiting = {str(b) for d in ("request", "response") if (b := (mode.get(d) or {}).get("body"))} - {"Streamed"}
            if ext.get("shadowMode") and waiting:
                raise res.error(
                    f"{path}.shadowMode",
                    "expected body mode Streamed or none with shadowMode "
                    f"(send-and-go cannot wait for {', '.join(sorted(waiting))} bodies)",
                )
            back_off = (((ext.get("backendSettings") or {}).get("retry") or {}).get("perRetry") or {}).get("backOff")
            if back_off is not None:
                _check_back_off(res, f"{path}.backendSettings.retry.perRetry.backOff", back_off)
        for index, wasm in enumerate(res.spec.get("wasm") or []):
            path = f"spec.wasm[{index}].code"
            code = wasm["code"]
            source = code["type"].lower()
            if code.get(source) is None:
                raise res.error(f"{path}.{source}", f"required for type {code['type']}")
            other = "image" if source == "http" else "http"
            if code.get(other) is not None:
                raise res.error(f"{path}.{other}", f"not allowed with type {code['type']}")
            secret = (code.get("image") or {}).get("pullSecretRef")
            if secret is not None:
                secret_ref(
                    self.resources,
                    res,
                    {**secret, "kind": secret.get("kind", "Secret")},
                    f"{path}.image.pullSecretRef",
                    (".dockerconfigjson",),
                )
            config = wasm.get("config")
            if config is not None and not isinstance(config, dict | list | str | int | float | bool):
                raise res.error(f"spec.wasm[{index}].config", "expected JSON-compatible data")

    def _SecurityPolicy(self, res: Resource) -> None:
        self._targets(res, ("Gateway", "HTTPRoute"))
        authorization = res.spec.get("authorization") or {}
        for r, rule in enumerate(authorization.get("rules") or []):
            for c, cidr in enumerate(rule["principal"]["clientCIDRs"]):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise res.error(
                        f"spec.authorization.rules[{r}].principal.clientCIDRs[{c}]",
                        f"expected a CIDR such as 10.0.1.0/24 or 2001:db8::/32, got {cidr!r}",
                    ) from None

    def _ClientTrafficPolicy(self, res: Resource) -> None:
        for path, ref in policy_targets(res):
            if ref["kind"] == "HTTPRoute":
                # EG's CRD refuses it ("only ... a targetRef.kind of Gateway or ListenerSet"); EG 1.1's release
                # post shows one, but client IP detection is a listener's setting, not a route's.
                raise res.error(
                    f"{path}.kind",
                    "expected Gateway (EG's CRD takes no HTTPRoute here: client IP detection belongs to a "
                    "listener); target the route's Gateway, with sectionName for one listener",
                )
        self._targets(res, ("Gateway",))
        xff = ((res.spec.get("clientIPDetection") or {}).get("xForwardedFor")) or {}
        for c, cidr in enumerate(xff.get("trustedCIDRs") or []):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise res.error(
                    f"spec.clientIPDetection.xForwardedFor.trustedCIDRs[{c}]", f"expected a CIDR, got {cidr!r}"
                ) from None

    def _BackendTrafficPolicy(self, res: Resource) -> None:
        self._targets(res, ("Gateway", "HTTPRoute"))
        lb = res.spec.get("loadBalancer")
        if lb is None:
            return
        consistent = lb.get("consistentHash")
        if (lb["type"] == "ConsistentHash") != (consistent is not None):
            raise res.error("spec.loadBalancer.consistentHash", "required with type ConsistentHash and only then")
        if consistent is not None:
            kind = consistent["type"]
            for field in ("header", "cookie"):
                if (kind.lower() == field) != (consistent.get(field) is not None):
                    raise res.error(
                        f"spec.loadBalancer.consistentHash.{field}", f"required with type {field.title()} and only then"
                    )
            size = consistent.get("tableSize", 65537)
            if not _is_prime(size):
                raise res.error(
                    "spec.loadBalancer.consistentHash.tableSize",
                    f"expected a prime number (Maglev needs one), got {size}",
                )

    def _EnvoyProxy(self, res: Resource) -> None:
        for index, entry in enumerate(res.spec.get("filterOrder") or []):
            if entry["name"] == entry.get("before", entry.get("after")):
                raise res.error(f"spec.filterOrder[{index}]", "a filter cannot be placed relative to itself")


# Target kinds EG's policy CRDs allow that this translator does not implement.
_EG_TARGET_KINDS = ("ListenerSet", "GRPCRoute", "TCPRoute", "UDPRoute", "TLSRoute")


@contextlib.contextmanager
def _eg_reason(res: Resource) -> Iterator[None]:
    """Tag a refusal of `res` with EG's reason (its Accepted=False reason), unless it already has one."""
    try:
        yield
    except ConfigError as exc:
        if not getattr(exc, "reason", ""):
            exc.reason = eg_default_reason(res.kind)  # type: ignore[attr-defined]
        raise


def _with_reason(exc: ConfigError, reason: str) -> ConfigError:
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


# EG's header value rule: visible ASCII, single spaces or tabs between words, nothing leading or trailing.
# Visible characters, single spaces or tabs between them. The separator is not optional: `([\t ]?[!-~]+)*`
# splits a run of letters every possible way and took exponential time on a value ending in a space.
_HEADER_VALUE = re.compile(r"[!-~]+(?:[\t ][!-~]+)*")


def _check_header_modifier(res: Resource, path: str, flt: dict[str, Any]) -> None:
    """EG refuses the route (UnsupportedValue) for a Host header or a value outside its rule, in add/set/remove."""
    field = "requestHeaderModifier" if flt["type"] == "RequestHeaderModifier" else "responseHeaderModifier"
    modifier = flt[field]
    for verb in ("add", "set", "remove"):
        for i, entry in enumerate(modifier.get(verb) or []):
            name = entry if verb == "remove" else entry["name"]
            where = f"{path}.{field}.{verb}[{i}]"
            if name.lower() == "host":
                raise res.error(
                    f"{where}" + ("" if verb == "remove" else ".name"),
                    "the Host header cannot be changed by a header modifier (use a URLRewrite hostname)",
                )
            if verb != "remove" and not _HEADER_VALUE.fullmatch(entry["value"]):
                raise res.error(
                    f"{where}.value",
                    f"expected visible ASCII with single spaces or tabs between words, got {entry['value']!r}",
                )


def _check_path_modifier(res: Resource, path: str, modifier: dict[str, Any]) -> None:
    """The field its type names is required and the other one refused, as EG decides."""
    wanted = "replaceFullPath" if modifier["type"] == "ReplaceFullPath" else "replacePrefixMatch"
    other = "replacePrefixMatch" if wanted == "replaceFullPath" else "replaceFullPath"
    if modifier.get(other) is not None:
        raise res.error(f"{path}.{other}", f"not allowed with type {modifier['type']}")
    if modifier.get(wanted) is None:
        raise res.error(f"{path}.{wanted}", f"required with type {modifier['type']}")


def _check_back_off(res: Resource, path: str, back_off: dict[str, Any]) -> None:
    """EG refuses a zero interval and a maximum below the base; Envoy needs a base interval."""
    base, most = back_off.get("baseInterval"), back_off.get("maxInterval")
    if base is None:
        raise res.error(f"{path}.baseInterval", "required with a backOff (Envoy needs a base interval)")
    for field, value in (("baseInterval", base), ("maxInterval", most)):
        if value is not None and parse_duration(value).total_seconds() == 0:
            raise res.error(f"{path}.{field}", f"cannot be {value} (EG refuses a zero interval)")
    if most is not None and parse_duration(most) < parse_duration(base):
        raise res.error(f"{path}.maxInterval", f"{most} is less than baseInterval {base}")


def failed_rules(route: Resource) -> dict[int, ConfigError]:
    """The rules of `route` whose filters EG cannot apply, each with why: EG answers 500 for them (its filter
    errors: a Host header or a value outside its rule in a header modifier, a path modifier without its
    field or with the other one, a second URLRewrite of the path or hostname)."""
    found: dict[int, ConfigError] = {}
    for r, rule in enumerate(route.spec.get("rules") or []):
        try:
            _check_rule_filters(route, r, rule.get("filters") or [])
        except ConfigError as exc:
            found[r] = exc
    return found


def _check_rule_filters(res: Resource, r: int, filters: list[dict[str, Any]]) -> None:
    rewrites = 0
    for f, flt in enumerate(filters):
        where = f"spec.rules[{r}].filters[{f}]"
        if flt["type"] in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            _check_header_modifier(res, where, flt)
        elif flt["type"] in ("URLRewrite", "RequestRedirect"):
            field = "urlRewrite" if flt["type"] == "URLRewrite" else "requestRedirect"
            path_modifier = flt[field].get("path")
            if path_modifier is not None:
                _check_path_modifier(res, f"{where}.{field}.path", path_modifier)
            if flt["type"] == "URLRewrite" and (path_modifier is not None or "hostname" in flt[field]):
                rewrites += 1
                if rewrites > 1:  # EG: "cannot configure multiple urlRewrite filters for a single rule"
                    raise res.error(where, "a second URLRewrite of the rule's path or hostname (EG refuses it)")


def dropped_rules(route: Resource) -> dict[int, ConfigError]:
    """The rules of `route` EG drops, each with why: a path, header or query parameter match whose regular
    expression Go's `regexp` does not compile (EG's processHTTPRouteRule, reason UnsupportedValue; regex.py)."""
    found: dict[int, ConfigError] = {}
    for r, rule in enumerate(route.spec.get("rules") or []):
        for m, match in enumerate(rule.get("matches") or []):
            pmatch = match.get("path") or {}
            regexes: list[str] = [pmatch.get("value", "")] if pmatch.get("type") == "RegularExpression" else []
            for field in ("headers", "queryParams"):
                regexes += [v["value"] for v in match.get(field) or [] if v.get("type") == "RegularExpression"]
            for regex in regexes:
                why = regex_error(regex)
                if why is not None:
                    found.setdefault(
                        r, route.error(f"spec.rules[{r}].matches[{m}]", f"invalid regular expression {regex!r}: {why}")
                    )
    return found


def _unmatched_reason(gateway: Resource, route: Resource, parent: dict[str, Any]) -> str:
    """EG's reason for a parentRef no listener accepts: no listener in that section/port, none allowing
    the route's namespace, or none whose hostname meets the route's."""
    candidates = [
        li
        for li in gateway.spec["listeners"]
        if parent.get("sectionName") in (None, li["name"]) and parent.get("port") in (None, li["port"])
    ]
    if not candidates:
        return "NoMatchingParent"
    allowed = [
        li
        for li in candidates
        if "HTTPRoute" in supported_route_kinds(li)
        and (
            ((li.get("allowedRoutes") or {}).get("namespaces") or {}).get("from", "Same") == "All"
            or route.namespace == gateway.namespace
        )
    ]
    return "NoMatchingListenerHostname" if allowed else "NotAllowedByListeners"


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def validate(resources: ResourceSet, *, strict_eg: bool = False) -> None:
    """Raise ConfigError for the first structural or cross-resource problem."""
    _Checker(resources, strict_eg).run()
