"""Which BackendTLSPolicy applies to a backend: clashes are decided per target, never by dropping TLS."""

from __future__ import annotations

import yaml

from sidecar.translate.backendtls import conflicted_tls_policies, tls_policy
from sidecar.translate.refs import BackendTarget
from sidecar.translate.resources import ResourceSet, parse_document


def _policy(name: str, created: str, *services: str) -> str:
    refs = ", ".join(f"{{group: '', kind: Service, name: {s}}}" for s in services)
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {{name: {name}, creationTimestamp: "{created}"}}
spec:
  targetRefs: [{refs}]
  validation: {{hostname: {name}.example.com, wellKnownCACertificates: System}}
"""


def _service(name: str) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec: {{clusterIP: 10.0.0.1, ports: [{{port: 443}}]}}
"""


def test_a_policy_that_clashes_on_one_target_still_applies_to_its_others() -> None:
    text = "---".join(
        [
            _service("s1"),
            _service("s2"),
            _policy("older", "2024-01-01T00:00:00Z", "s1"),
            _policy("younger", "2024-06-01T00:00:00Z", "s1", "s2"),
        ]
    )
    resources = ResourceSet(parse_document(d, f"@{i}") for i, d in enumerate(yaml.safe_load_all(text)))
    s1, s2 = resources.of("Service")[:2]
    assert [p.name for p in conflicted_tls_policies(resources).values()] == ["older"]
    applied_s1 = tls_policy(resources, BackendTarget(s1, 443, 1))
    applied_s2 = tls_policy(resources, BackendTarget(s2, 443, 1))
    assert applied_s1 is not None and applied_s1.name == "older"
    assert applied_s2 is not None and applied_s2.name == "younger"  # was None: s2 went out in plain text
