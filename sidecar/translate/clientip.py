"""ClientTrafficPolicy clientIPDetection -> how an HTTP connection manager finds the client's address.

The address found here is what RBAC's `remote_ip` and EG's client-CIDR matchers see, so getting it wrong
is an allow-list bypass. This is EG's listener, rule for rule (v1.9.0, internal/xds/translator/listener.go):

* no detection: `use_remote_address: true`, nothing trusted from X-Forwarded-For (the peer is the client);
* any detection: `use_remote_address: false` and one original-IP-detection extension, which decides alone;
* `xForwardedFor.numTrustedHops: N` -> the `xff` extension with `xff_num_trusted_hops: max(N - 1, 0)`. EG
  subtracts one since Envoy changed how the extension counts (envoyproxy/envoy#34241): with N = 1 the
  client is the right-most X-Forwarded-For entry, the one the single trusted proxy appended;
* `xForwardedFor.trustedCIDRs` -> the `xff` extension with those ranges: entries are skipped from the right
  while they (and the peer) are trusted;
* `disableXForwardedForAppend` -> the extension's `skip_xff_append` (Envoy leaves X-Forwarded-For as is);
* `customHeader` -> the `custom_header` extension, marking the address trusted, and answering 403 when the
  header is missing or unparsable if `failClosed`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sidecar.translate.messages import pack
from sidecar.translate.resources import Resource

__all__ = ["CUSTOM_HEADER", "XFF", "client_ip_settings", "trusted_hops"]

XFF = "envoy.extensions.http.original_ip_detection.xff"
CUSTOM_HEADER = "envoy.extensions.http.original_ip_detection.custom_header"


def trusted_hops(num_trusted_hops: int) -> int:
    """What Envoy's xff extension is told for EG's `numTrustedHops`."""
    return max(num_trusted_hops - 1, 0)


def client_ip_settings(policy: Resource | None, hcm: Any) -> None:
    """Set `hcm`'s client address detection from `policy` (None: no ClientTrafficPolicy in force)."""
    detection = (policy.spec.get("clientIPDetection") if policy is not None else None) or {}
    extension = _extension(detection)
    hcm.use_remote_address = extension is None
    hcm.original_ip_detection_extensions = [extension] if extension is not None else []


def _extension(detection: dict[str, Any]) -> Any | None:
    from envoy_data_plane.envoy.config.core.v3 import CidrRange, TypedExtensionConfig
    from envoy_data_plane.envoy.extensions.http.original_ip_detection.custom_header.v3 import CustomHeaderConfig
    from envoy_data_plane.envoy.extensions.http.original_ip_detection.xff.v3 import XffConfig, XffTrustedCidrs
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode

    header = detection.get("customHeader")
    if header is not None:
        config = CustomHeaderConfig(header_name=header["name"], allow_extension_to_set_address_as_trusted=True)
        if header.get("failClosed"):
            config.reject_with_status = HttpStatus(code=StatusCode.Forbidden)
        return TypedExtensionConfig(name=CUSTOM_HEADER, typed_config=pack(config))
    xff = detection.get("xForwardedFor")
    if xff is None:
        return None
    skip_append = bool(xff.get("disableXForwardedForAppend", False))
    if xff.get("trustedCIDRs") is not None:
        ranges = []
        for cidr in xff["trustedCIDRs"]:
            net = ipaddress.ip_network(cidr, strict=False)
            ranges.append(CidrRange(address_prefix=str(net.network_address), prefix_len=net.prefixlen))
        xff_config = XffConfig(xff_trusted_cidrs=XffTrustedCidrs(cidrs=ranges), skip_xff_append=skip_append)
    else:
        hops = trusted_hops(int(xff.get("numTrustedHops", 0)))
        xff_config = XffConfig(xff_num_trusted_hops=hops, skip_xff_append=skip_append)
    return TypedExtensionConfig(name=XFF, typed_config=pack(xff_config))
