"""EG's own xDS (`../shared/reference/eg-v1.9.0/xds-testdata`) as a static Envoy bootstrap, for differential tests.

EG's translator test data holds, per feature, the listeners, route configurations, clusters and endpoints
EG serves over ADS. `EgXds` loads them and `bootstrap()` turns them into what a lone Envoy can run:
each HTTP connection manager gets its route configuration inline instead of over RDS, each EDS cluster
becomes STATIC with its endpoints inline, every listener binds a loopback address on an ephemeral port,
and every upstream endpoint is replaced by a loopback test backend. Nothing else is changed: what Envoy
does with a request is what EG's config does with it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.translate_corpus import SHARED

XDS = SHARED / "xds-testdata"
HCM = "envoy.filters.network.http_connection_manager"


def _load(path: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


#: EG's bootstrap carries this runtime layer (its bootstrap template): Envoy then takes route regexes of any RE2
#: program size, where it refuses the whole config past 100 by default.
EG_RUNTIME = {
    "layers": [
        {
            "name": "global_config",
            "static_layer": {"re2.max_program_size.error_level": 4294967295, "re2.max_program_size.warn_level": 1000},
        }
    ]
}


@dataclass
class EgXds:
    """The xDS EG wrote for one `xds-testdata` case."""

    listeners: list[dict[str, Any]]
    routes: list[dict[str, Any]]
    clusters: list[dict[str, Any]]
    endpoints: list[dict[str, Any]]

    @classmethod
    def load(cls, name: str) -> EgXds:
        parts = (_load(XDS / f"{name}.{kind}.yaml") for kind in ("listeners", "routes", "clusters", "endpoints"))
        return cls(*parts)

    def hcms(self) -> Iterator[dict[str, Any]]:
        """Every HTTP connection manager config (the typedConfig), in listener order."""
        for listener in self.listeners:
            chains = [listener.get("defaultFilterChain"), *(listener.get("filterChains") or [])]
            for chain in chains:
                for flt in (chain or {}).get("filters") or []:
                    if flt.get("name") == HCM:
                        yield flt["typedConfig"]

    def bootstrap(
        self, address: str, upstream: tuple[str, int], per_cluster: dict[str, tuple[str, int]] | None = None
    ) -> dict[str, Any]:
        """A static bootstrap: listeners on `address` (ephemeral ports), every endpoint at `upstream` (or, for
        a cluster named in `per_cluster`, at its own, even where EG's data gives it none)."""
        routes = {rc["name"]: rc for rc in self.routes}
        listeners = copy.deepcopy(self.listeners)
        for listener in listeners:
            listener["address"] = {"socketAddress": {"address": address, "portValue": 0}}
        for hcm in EgXds(listeners, [], [], []).hcms():
            rds = hcm.pop("rds", None)
            if rds is not None:
                hcm["routeConfig"] = copy.deepcopy(routes[rds["routeConfigName"]])
        loads = {cla["clusterName"]: cla for cla in self.endpoints}
        clusters = copy.deepcopy(self.clusters)
        for cluster in clusters:
            host, port = (per_cluster or {}).get(cluster["name"], upstream)
            eds = cluster.pop("edsClusterConfig", None)
            if cluster.get("type") == "EDS":
                cluster["type"] = "STATIC"
                name = (eds or {}).get("serviceName", cluster["name"])
                cluster["loadAssignment"] = copy.deepcopy(loads.get(name, {"clusterName": name}))
            localities = (cluster.get("loadAssignment") or {}).get("endpoints") or []
            if cluster["name"] in (per_cluster or {}) and not any(loc.get("lbEndpoints") for loc in localities):
                # EG's data leaves some clusters without hosts (a Service it was not given): one, the test's.
                cluster["loadAssignment"] = {"clusterName": cluster["name"], "endpoints": [{"lbEndpoints": [{}]}]}
            for locality in (cluster.get("loadAssignment") or {}).get("endpoints") or []:
                for lb_endpoint in locality.get("lbEndpoints") or []:
                    socket = {"socketAddress": {"address": host, "portValue": port}}
                    lb_endpoint.setdefault("endpoint", {})["address"] = socket
        return {"static_resources": {"listeners": listeners, "clusters": clusters}, "layered_runtime": EG_RUNTIME}
