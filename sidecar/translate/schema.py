"""Structural schemas of the resources: what each spec may hold, and the small checker that enforces it.

`check_structure(res)` checks one resource on its own: its top-level envelope, then its spec against
`SPEC_SCHEMAS[kind]`. The node types mirror the OpenAPI v3 constructs EG's CRDs use (object, array,
string with pattern and length, integer with bounds, enum, one-of); the declarations below cover the
fields the translator implements. Each `check` raises ConfigError naming the resource and the field
path, and saying what was expected. Fields the translator does not implement are *unknown* here on
purpose: ignoring them silently would produce an Envoy that behaves differently from EG. Rules that
need other resources (a reference resolves, a Secret holds a key) are in rules.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from sidecar.translate.order import FILTER_ALIASES, FILTER_NAMES
from sidecar.translate.resources import Resource

__all__ = [
    "ANY",
    "BOOL",
    "HOSTNAME",
    "SPEC_SCHEMAS",
    "Duration",
    "Enum",
    "Int",
    "List",
    "Node",
    "Obj",
    "Str",
    "StrMap",
    "check_structure",
]


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class Node:
    expected = "a value"

    def check(self, res: Resource, value: Any, path: str) -> None:
        raise NotImplementedError

    def fail(self, res: Resource, path: str, value: Any, expected: str | None = None) -> Exception:
        return res.error(path, f"expected {expected or self.expected}, got {value!r}")


class _Any(Node):
    def check(self, res: Resource, value: Any, path: str) -> None:
        return None


class _Bool(Node):
    expected = "true or false"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise self.fail(res, path, value)


ANY = _Any()
BOOL = _Bool()


class Str(Node):
    def __init__(self, pattern: str | None = None, max_len: int = 253, min_len: int = 1, what: str = "") -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.max_len = max_len
        self.min_len = min_len
        self.expected = what or f"a string of {min_len} to {max_len} characters"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, str) or not self.min_len <= len(value) <= self.max_len:
            raise self.fail(res, path, value)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise self.fail(res, path, value)


class Duration(Str):
    """Gateway API durations: up to four `<number><unit>` groups, units h, m, s, ms."""

    def __init__(self) -> None:
        super().__init__(r"([0-9]{1,5}(h|m|s|ms)){1,4}", 64, what="a duration such as 500ms, 5s or 1m30s")


class Int(Node):
    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.expected = f"an integer from {minimum} to {maximum}"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not self.minimum <= value <= self.maximum:
            raise self.fail(res, path, value)


class Enum(Node):
    """One of `values`. `unsupported` are values EG's CRD allows that this translator does not implement:
    they are refused as unsupported (out of scope), not as invalid."""

    def __init__(self, *values: Any, unsupported: tuple[Any, ...] = ()) -> None:
        self.values = values
        self.unsupported = unsupported
        self.expected = "one of " + ", ".join(str(v) for v in values)

    def check(self, res: Resource, value: Any, path: str) -> None:
        if value in self.unsupported and isinstance(value, str):
            raise res.error(
                path, f"unsupported value {value!r} (this translator implements {', '.join(map(str, self.values))})"
            )
        if value not in self.values or isinstance(value, bool) != isinstance(self.values[0], bool):
            raise self.fail(res, path, value)


class ListenerProtocol(Node):
    """A listener's protocol: any name Gateway API's pattern allows. Which ones are served is EG's decision
    per listener (listeners.py: a name EG does not implement refuses that listener, UnsupportedProtocol),
    and which of EG's this translator implements is rules.py's (TLS, TCP and UDP are refused as unsupported
    where EG would serve them)."""

    expected = "a protocol name such as HTTP or HTTPS"
    # Gateway API's pattern for a protocol: a plain name, or a domain-prefixed one such as example.com/proto.
    _NAME = re.compile(
        r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?"
        r"|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[a-zA-Z0-9]+"
    )

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not (isinstance(value, str) and len(value) <= 255 and self._NAME.fullmatch(value) is not None):
            raise self.fail(res, path, value)


class List(Node):
    def __init__(self, item: Node, max_items: int = 64, min_items: int = 0) -> None:
        self.item = item
        self.max_items = max_items
        self.min_items = min_items
        self.expected = f"a list of {min_items} to {max_items} items"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, list) or not self.min_items <= len(value) <= self.max_items:
            raise self.fail(res, path, value if not isinstance(value, list) else f"{len(value)} items")
        for index, item in enumerate(value):
            self.item.check(res, item, _join(path, index))


class StrMap(Node):
    expected = "a mapping of strings to strings"

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise self.fail(res, path, value)


class Obj(Node):
    """A mapping with known fields. `one_of` groups need exactly one member set; `at_most_one` at most one."""

    expected = "a mapping"

    def __init__(
        self,
        fields: Mapping[str, Node],
        required: Sequence[str] = (),
        one_of: Sequence[Sequence[str]] = (),
        at_most_one: Sequence[Sequence[str]] = (),
    ) -> None:
        self.fields = dict(fields)
        self.required = tuple(required)
        self.one_of = tuple(tuple(g) for g in one_of)
        self.at_most_one = tuple(tuple(g) for g in at_most_one)

    def check(self, res: Resource, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise self.fail(res, path, value)
        for key in value:
            if key not in self.fields:
                known = ", ".join(sorted(self.fields)) or "none"
                raise res.error(_join(path, str(key)), f"unknown or unsupported field (expected one of {known})")
        # The values present first: an unsupported value explains a missing field better than the other way.
        for key, item in value.items():
            if item is not None:
                self.fields[key].check(res, item, _join(path, key))
        for key in self.required:
            if key not in value:
                raise res.error(_join(path, key), "required field is missing")
        for group in self.one_of:
            present = [k for k in group if value.get(k) is not None]
            if len(present) != 1:
                raise res.error(
                    path or "spec",
                    f"expected exactly one of {', '.join(group)}, got {', '.join(present) if present else 'none'}",
                )
        for group in self.at_most_one:
            present = [k for k in group if value.get(k) is not None]
            if len(present) > 1:
                raise res.error(path or "spec", f"expected at most one of {', '.join(group)}, got {', '.join(present)}")


# ---- the declarations: each kind's spec, as far as the translator implements it --------------------

_NAME = Str(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", 253, what="a resource name")
_GROUP = Str(
    r"^$|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
    253,
    min_len=0,
    what="an API group ('' for the core group)",
)
_KIND = Str(r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?", 63, what="a kind")
_PORT = Int(1, 65535)
HOSTNAME = Str(
    r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
    253,
    what="a hostname such as www.example.com or *.example.com",
)
_HEADER_NAME = Str(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+", 256, what="an HTTP header name")
_SHA256 = Str(r"[a-f0-9]{64}", 64, 64, what="64 lower-case hex digits")
_ATTRIBUTE = Str(
    r"(connection\.|source\.|destination\.|request\.|response\.|upstream\.|xds\.route_)[a-z_1-9]*",
    253,
    what="an attribute name starting with connection., source., destination., request., response., "
    "upstream. or xds.route_",
)

_TARGET_REF = Obj({"group": _GROUP, "kind": _KIND, "name": _NAME, "sectionName": _NAME}, ["group", "kind", "name"])
# EG's CRDs set no maximum on targetRefs (EG accepts 18 and more); this cap only bounds the work a render does.
MAX_TARGET_REFS = 1024
_POLICY_TARGETS = {"targetRef": _TARGET_REF, "targetRefs": List(_TARGET_REF, MAX_TARGET_REFS, 1)}
_OBJECT_REF = Obj({"group": _GROUP, "kind": _KIND, "name": _NAME, "namespace": _NAME}, ["name"])
_BACKEND_REF = Obj(
    {"group": _GROUP, "kind": _KIND, "name": _NAME, "namespace": _NAME, "port": _PORT, "weight": Int(0, 1000000)},
    ["name"],
)
_HEADER_VALUE = Obj({"name": _HEADER_NAME, "value": Str(max_len=4096, min_len=0)}, ["name", "value"])
_HEADER_MODIFIER = Obj(
    {"set": List(_HEADER_VALUE, 16), "add": List(_HEADER_VALUE, 16), "remove": List(_HEADER_NAME, 16)}
)
_PATH_MODIFIER = Obj(
    {
        "type": Enum("ReplaceFullPath", "ReplacePrefixMatch"),
        "replaceFullPath": Str(max_len=1024),
        "replacePrefixMatch": Str(max_len=1024, min_len=0),
    },
    ["type"],
)
_ROUTE_FILTER = Obj(
    {
        "type": Enum(
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestRedirect",
            "URLRewrite",
            unsupported=("RequestMirror", "ExtensionRef", "CORS", "ExternalAuth"),
        ),
        "requestHeaderModifier": _HEADER_MODIFIER,
        "responseHeaderModifier": _HEADER_MODIFIER,
        "requestRedirect": Obj(
            {
                "scheme": Enum("http", "https"),
                "hostname": HOSTNAME,
                "path": _PATH_MODIFIER,
                "port": _PORT,
                "statusCode": Enum(301, 302, 303, 307, 308),
            }
        ),
        "urlRewrite": Obj({"hostname": HOSTNAME, "path": _PATH_MODIFIER}),
    },
    ["type"],
)
_MATCH_VALUE = Obj(
    {"type": Enum("Exact", "RegularExpression"), "name": _HEADER_NAME, "value": Str(max_len=4096)}, ["name", "value"]
)
_ROUTE_MATCH = Obj(
    {
        "path": Obj({"type": Enum("Exact", "PathPrefix", "RegularExpression"), "value": Str(max_len=1024)}),
        "headers": List(_MATCH_VALUE, 16),
        "queryParams": List(_MATCH_VALUE, 16),
        "method": Enum("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"),
    }
)
_ROUTE_RULE = Obj(
    {
        "name": _NAME,
        "matches": List(_ROUTE_MATCH, 64),
        "filters": List(_ROUTE_FILTER, 16),
        "backendRefs": List(_BACKEND_REF, 16),
        "timeouts": Obj({"request": Duration()}),
    }
)
_PARENT_REF = Obj(
    {"group": _GROUP, "kind": _KIND, "namespace": _NAME, "name": _NAME, "sectionName": _NAME, "port": _PORT}, ["name"]
)
_SECRET_REF = Obj({"group": _GROUP, "kind": _KIND, "name": _NAME, "namespace": _NAME}, ["name"])
_LISTENER = Obj(
    {
        "name": _NAME,
        "hostname": HOSTNAME,
        "port": _PORT,
        "protocol": ListenerProtocol(),
        "tls": Obj({"mode": Enum("Terminate", "Passthrough"), "certificateRefs": List(_SECRET_REF, 64, 1)}),
        "allowedRoutes": Obj(
            {
                "namespaces": Obj({"from": Enum("Same", "All", unsupported=("Selector",))}),
                # Which of them EG accepts is its decision per listener (listeners.py: InvalidRouteKinds).
                "kinds": List(Obj({"group": _GROUP, "kind": _KIND}, ["kind"]), 8),
            }
        ),
    },
    ["name", "port", "protocol"],
)
_PROCESSING_DIRECTION = Obj(
    {"body": Enum("Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed"), "attributes": List(_ATTRIBUTE, 32)}
)
_BACKEND_SETTINGS = Obj(
    {
        "timeout": Obj({"tcp": Obj({"connectTimeout": Duration()})}),
        "circuitBreaker": Obj({"maxParallelRetries": Int(0, 4294967295)}),
        "retry": Obj(
            {
                "numRetries": Int(0, 2147483647),
                "retryOn": Obj(
                    {
                        "triggers": List(
                            Enum(
                                "5xx",
                                "gateway-error",
                                "reset",
                                "reset-before-request",
                                "connect-failure",
                                "retriable-4xx",
                                "refused-stream",
                                "retriable-status-codes",
                                "cancelled",
                                "deadline-exceeded",
                                "internal",
                                "resource-exhausted",
                                "unavailable",
                            ),
                            16,
                        )
                    }
                ),
                "perRetry": Obj({"backOff": Obj({"baseInterval": Duration(), "maxInterval": Duration()})}),
            }
        ),
        "healthCheck": Obj(
            {
                "active": Obj(
                    {
                        "type": Enum("GRPC"),
                        "grpc": Obj({"service": Str()}),
                        "interval": Duration(),
                        "timeout": Duration(),
                        "unhealthyThreshold": Int(1, 2147483647),
                        "healthyThreshold": Int(1, 2147483647),
                    },
                    ["type"],
                ),
                "passive": Obj(
                    {
                        "splitExternalLocalOriginErrors": BOOL,
                        "consecutiveLocalOriginFailures": Int(0, 2147483647),
                        "consecutiveGatewayErrors": Int(0, 2147483647),
                        "interval": Duration(),
                        "baseEjectionTime": Duration(),
                        "maxEjectionPercent": Int(0, 100),
                    }
                ),
            }
        ),
    }
)
_EXT_PROC = Obj(
    {
        # EG refuses the singular `backendRef` here ("BackendRefs must be used").
        "backendRefs": List(_BACKEND_REF, 16, 1),
        "messageTimeout": Duration(),
        "failOpen": BOOL,
        "shadowMode": BOOL,
        "statusOnError": Enum(
            400,
            401,
            402,
            403,
            404,
            405,
            406,
            407,
            408,
            409,
            410,
            411,
            412,
            413,
            414,
            415,
            416,
            417,
            421,
            422,
            423,
            424,
            426,
            428,
            429,
            431,
            500,
            501,
            502,
            503,
            504,
            505,
            506,
            507,
            508,
            510,
            511,
        ),
        "processingMode": Obj(
            {"request": _PROCESSING_DIRECTION, "response": _PROCESSING_DIRECTION, "allowModeOverride": BOOL}
        ),
        "metadata": Obj({"accessibleNamespaces": List(Str(), 16), "writableNamespaces": List(Str(), 8)}),
        # What `render --format eg` writes for the sidecar's own Backend (backends.eg_backend_settings);
        # `sidecar render` builds the same into the cluster itself and refuses it in its input (policies.py).
        "backendSettings": _BACKEND_SETTINGS,
    },
    ["backendRefs"],
)
_WASM_CODE = Obj(
    {
        "type": Enum("HTTP", "Image", unsupported=("ConfigMap",)),
        "http": Obj({"url": Str(r"https?://\S+", 2048, what="an http:// or https:// URL"), "sha256": _SHA256}, ["url"]),
        "image": Obj({"url": Str(max_len=2048), "sha256": _SHA256, "pullSecretRef": _SECRET_REF}, ["url"]),
        "pullPolicy": Enum("IfNotPresent", "Always"),
    },
    ["type"],
)
_WASM = Obj(
    {
        "name": _NAME,
        "rootID": Str(max_len=253),
        "code": _WASM_CODE,
        "config": ANY,
        "failOpen": BOOL,
        "env": Obj({"hostKeys": List(Str(), 64)}),
        # Accepted where EG 1.1's release blog put it; the CRD has it under `code`.
        "pullPolicy": Enum("IfNotPresent", "Always"),
    },
    ["code"],
)
_ENDPOINT = Obj(
    {
        "ip": Obj({"address": Str(max_len=45), "port": _PORT}, ["address", "port"]),
        "fqdn": Obj({"hostname": Str(max_len=253), "port": _PORT}, ["hostname", "port"]),
        "unix": Obj({"path": Str(max_len=108, what="a socket path of at most 108 characters")}, ["path"]),
        "zone": Str(),
    },
    one_of=[("ip", "fqdn", "unix")],
)
_CIDR = Str(r"[0-9a-fA-F:.]+/[0-9]{1,3}", 64, what="a CIDR such as 10.0.1.0/24 or 2001:db8::/32")

_FILTER = Enum(*FILTER_NAMES, *FILTER_ALIASES)

SPEC_SCHEMAS: dict[str, Node] = {
    "GatewayClass": ANY,
    "Gateway": Obj(
        {
            "gatewayClassName": _NAME,
            "listeners": List(_LISTENER, 64, 1),
            "infrastructure": Obj(
                {"parametersRef": Obj({"group": _GROUP, "kind": _KIND, "name": _NAME}, ["group", "kind", "name"])}
            ),
        },
        ["gatewayClassName", "listeners"],
    ),
    "HTTPRoute": Obj(
        {"parentRefs": List(_PARENT_REF, 32), "hostnames": List(HOSTNAME, 16), "rules": List(_ROUTE_RULE, 16)}
    ),
    "Backend": Obj(
        {
            "type": Enum("Endpoints", unsupported=("DynamicResolver",)),
            "endpoints": List(_ENDPOINT, 64, 1),
            "appProtocols": List(
                Enum("gateway.envoyproxy.io/h2c", "gateway.envoyproxy.io/ws", "gateway.envoyproxy.io/wss"), 41
            ),
            "fallback": BOOL,
            # The server-validation half of EG's BackendTLSSettings (backendtls.upstream_tls); client
            # certificates, versions, ciphers, ALPN and auto SNI are not implemented (unknown fields).
            "tls": Obj(
                {
                    "caCertificateRefs": List(
                        Obj({"group": _GROUP, "kind": _KIND, "name": _NAME}, ["group", "kind", "name"]), 8
                    ),
                    "wellKnownCACertificates": Enum("System"),
                    "insecureSkipVerify": BOOL,
                    "sni": Str(
                        r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", 253, what="a DNS name"
                    ),
                },
                at_most_one=[("caCertificateRefs", "wellKnownCACertificates")],
            ),
        },
        ["endpoints"],
    ),
    "BackendTLSPolicy": Obj(
        {
            # group is required, "" for the core group: Gateway API's CRD refuses a targetRef without one (EG's
            # own harness reads it leniently as "", a cluster never hands it such a policy).
            "targetRefs": List(
                Obj({"group": _GROUP, "kind": _KIND, "name": _NAME, "sectionName": _NAME}, ["group", "kind", "name"]),
                16,
                1,
            ),
            "validation": Obj(
                {
                    "caCertificateRefs": List(
                        Obj({"group": _GROUP, "kind": _KIND, "name": _NAME}, ["group", "kind", "name"]), 8
                    ),
                    "wellKnownCACertificates": Enum("System"),
                    "hostname": HOSTNAME,
                    "subjectAltNames": List(
                        Obj(
                            {
                                "type": Enum("Hostname", "URI"),
                                "hostname": HOSTNAME,
                                "uri": Str(
                                    r"(([^:/?#]+):)(//([^/?#]*))([^?#]*)(\?([^#]*))?(#(.*))?", 253, what="a URI"
                                ),
                            },
                            ["type"],
                        ),
                        5,
                    ),
                },
                ["hostname"],
            ),
        },
        ["targetRefs", "validation"],
    ),
    # Gateway API's CRD: from and to, 1 to 16 entries each; from names group, kind and namespace.
    "ReferenceGrant": Obj(
        {
            "from": List(
                Obj({"group": _GROUP, "kind": _KIND, "namespace": _NAME}, ["group", "kind", "namespace"]), 16, 1
            ),
            "to": List(Obj({"group": _GROUP, "kind": _KIND, "name": _NAME}, ["group", "kind"]), 16, 1),
        },
        ["from", "to"],
    ),
    "EnvoyExtensionPolicy": Obj({**_POLICY_TARGETS, "extProc": List(_EXT_PROC, 16), "wasm": List(_WASM, 16)}),
    "SecurityPolicy": Obj(
        {
            **_POLICY_TARGETS,
            "authorization": Obj(
                {
                    "defaultAction": Enum("Allow", "Deny"),
                    "rules": List(
                        Obj(
                            {
                                "name": _NAME,
                                "action": Enum("Allow", "Deny"),
                                "principal": Obj({"clientCIDRs": List(_CIDR, 256, 1)}, ["clientCIDRs"]),
                            },
                            ["action", "principal"],
                        ),
                        128,
                    ),
                }
            ),
        }
    ),
    "ClientTrafficPolicy": Obj(
        {
            **_POLICY_TARGETS,
            "clientIPDetection": Obj(
                {
                    "xForwardedFor": Obj(
                        {
                            # int32 as in EG's CRD; EG treats 0 and below alike (the right-most entry).
                            "numTrustedHops": Int(0, 2**32 - 1),
                            "trustedCIDRs": List(_CIDR, 64, 1),
                            "disableXForwardedForAppend": BOOL,
                        },
                        one_of=[("numTrustedHops", "trustedCIDRs")],
                    ),
                    "customHeader": Obj({"name": Str(r"[A-Za-z0-9-]+", 255), "failClosed": BOOL}, ["name"]),
                },
                one_of=[("xForwardedFor", "customHeader")],
            ),
        }
    ),
    "BackendTrafficPolicy": Obj(
        {
            **_POLICY_TARGETS,
            "loadBalancer": Obj(
                {
                    "type": Enum(
                        "ConsistentHash", "LeastRequest", "Random", "RoundRobin", unsupported=("BackendUtilization",)
                    ),
                    "consistentHash": Obj(
                        {
                            "type": Enum("SourceIP", "Header", "Cookie", unsupported=("Headers", "QueryParams")),
                            "header": Obj({"name": _HEADER_NAME}, ["name"]),
                            "cookie": Obj(
                                {"name": Str(max_len=256), "ttl": Duration(), "attributes": StrMap()}, ["name"]
                            ),
                            "tableSize": Int(2, 5000011),
                        },
                        ["type"],
                    ),
                },
                ["type"],
            ),
        }
    ),
    "EnvoyProxy": Obj(
        {
            "filterOrder": List(
                Obj({"name": _FILTER, "before": _FILTER, "after": _FILTER}, ["name"], one_of=[("before", "after")]), 32
            ),
            # Used by `--format eg` (the sidecar container patch); the local runtime ignores it.
            "provider": ANY,
        }
    ),
    # Services are only ever referenced (their ports checked); the rest of a Service spec is not ours.
    "Service": Obj(
        {
            "ports": List(
                Obj(
                    {
                        "port": _PORT,
                        "name": Str(),
                        "protocol": Enum("TCP", "UDP", "SCTP"),
                        "targetPort": ANY,
                        "appProtocol": Str(),
                        "nodePort": ANY,
                    },
                    ["port"],
                ),
                64,
            ),
            "type": Enum("ClusterIP", "ExternalName", "NodePort", "LoadBalancer"),
            "clusterIP": Str(max_len=45),
            "externalName": HOSTNAME,
            **{
                k: ANY
                for k in (
                    "selector",
                    "clusterIPs",
                    "ipFamilies",
                    "ipFamilyPolicy",
                    "sessionAffinity",
                    "externalTrafficPolicy",
                )
            },
        }
    ),
}

_ENVELOPE = {"apiVersion", "kind", "metadata", "spec", "status"}
_DATA_ENVELOPE = {"apiVersion", "kind", "metadata", "type", "data", "stringData", "binaryData", "immutable"}


def check_structure(res: Resource) -> None:
    """The envelope of `res` (top-level fields; data maps of Secrets and ConfigMaps), then its spec."""
    allowed = _DATA_ENVELOPE if res.kind in ("Secret", "ConfigMap") else _ENVELOPE
    for key in res.data:
        if key not in allowed:
            raise res.error(str(key), f"unknown top-level field (expected one of {', '.join(sorted(allowed))})")
    if res.kind in ("Secret", "ConfigMap"):
        for key in ("data", "stringData"):
            value = res.data.get(key)
            if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                raise res.error(key, "expected a mapping of keys to strings")
        return
    if res.kind != "GatewayClass" and not isinstance(res.data.get("spec"), dict):
        raise res.error("spec", "required (a mapping)")
    SPEC_SCHEMAS[res.kind].check(res, res.spec, "spec")
