"""The chart's standalone in-process option (`inProcess.enabled`): Envoy alone, from the sidecar image, runs the
chains inside it. Rendered by a real helm; the filter it writes checked against the one `sidecar envoy-config
--in-process` writes (`sidecar.inprocess.module.http_filter`), and its bootstrap run in a real Envoy with the
module built here."""

from __future__ import annotations

import json
import sysconfig
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.stack.demo import EchoBackend
from sidecar.stack.envoy import Envoy
from tests.support.chart import CI, all_containers
from tests.support.helm import Render, helm_template

VALUES = CI / "standalone-inprocess-values.yaml"
CONFIG_PATH = "/etc/envoy-sidecar/config/sidecar.yaml"


def _bootstrap(docs: list[dict[str, Any]]) -> dict[str, Any]:
    data = next(d for d in docs if d["kind"] == "ConfigMap" and "envoy.yaml" in d["data"])["data"]["envoy.yaml"]
    bootstrap: dict[str, Any] = yaml.safe_load(data)
    return bootstrap


def _http_filters(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    return filters


def test_envoy_runs_from_the_sidecar_image_with_no_sidecar_beside_it(render: Render) -> None:
    docs = render(VALUES, sets={"inProcess.concurrency": "3", "pluginFiles.mine\\.py": "X = 1"})
    containers = {c["name"]: c for c, _ in all_containers(docs) if c["name"] != "request"}  # not the helm test pod
    assert sorted(containers) == ["envoy"]
    envoy = containers["envoy"]
    assert envoy["image"] == "ghcr.io/envoy-sidecar/envoy-sidecar:0.1.0"  # image.*, not standalone.envoy.image
    assert envoy["command"] == ["envoy"]
    assert envoy["args"][:2] == ["--concurrency", "3"]
    env = {e["name"]: e["value"] for e in envoy["env"]}
    assert env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] == "/opt/sidecar/modules"
    assert env["PYTHONPATH"].split(":")[0] == "/etc/envoy-sidecar/plugins"
    mounts = {m["mountPath"]: m for m in envoy["volumeMounts"]}
    assert mounts[str(Path(CONFIG_PATH).parent)]["readOnly"] is True
    assert mounts["/etc/envoy-sidecar/plugins"]["readOnly"] is True
    assert envoy["securityContext"]["readOnlyRootFilesystem"] is True and "/tmp" in mounts
    bootstrap = _bootstrap(docs)
    names = [f["name"] for f in _http_filters(bootstrap)]
    assert names == ["sidecar.inprocess.default", "envoy.filters.http.router"]
    assert [c["name"] for c in bootstrap["static_resources"]["clusters"]] == ["upstream"]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])["data"]["sidecar.yaml"]
    assert "header-stamp" in config  # the file the module loads is the one the sidecar would have


def test_the_charts_filter_is_the_one_envoy_config_writes() -> None:
    """Same module, same filter name, same filter config keys and factory: the chart cannot drift from the code."""
    from sidecar.inprocess.module import http_filter
    from tests.support.helm import helm_binary

    for timeout, deadline in (("500ms", 500), ("250ms", 250), ("2s", 2000)):
        sets = {"extProc.messageTimeout": timeout, "inProcess.maxBodyBytes": "1024"}
        proc = helm_template(helm_binary(), VALUES, sets=sets)
        assert proc.returncode == 0, proc.stderr
        ours = _http_filters(_bootstrap([d for d in yaml.safe_load_all(proc.stdout) if d]))[0]
        code = http_filter(Path(CONFIG_PATH), "default", hook_deadline_ms=deadline, max_body_bytes=1024)
        chart_config = json.loads(ours["typed_config"]["filter_config"]["value"])
        code_config = json.loads(code["typed_config"]["filter_config"]["value"])
        assert chart_config["site"] == ["/opt/sidecar/site"]  # the image's fixed path (images/Dockerfile)
        chart_config.pop("site"), code_config.pop("site")
        assert chart_config == code_config
        for key in ("@type", "dynamic_module_config", "filter_name"):
            assert ours["typed_config"][key] == code["typed_config"][key], key


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            {"mode": "envoyGateway", "envoyGateway.gateway.name": "eg", "envoyGateway.targets[0].kind": "Gateway"}
            | {"envoyGateway.targets[0].name": "eg"},
            "inProcess.enabled: only with mode: standalone",
        ),
        ({"inProcess.concurrency": "0"}, "concurrency"),
        ({"inProcess.enabled": "yes"}, "enabled"),
    ],
)
def test_bad_in_process_values_fail_with_a_message(helm: Path, sets: dict[str, str], message: str) -> None:
    proc = helm_template(helm, VALUES, sets=sets)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.envoy
@pytest.mark.skipif(not sysconfig.get_config_var("Py_ENABLE_SHARED"), reason="this Python has no libpython.so")
def test_the_charts_bootstrap_runs_the_plugins_in_a_real_envoy(render: Render, tmp_path: Path) -> None:
    """The rendered bootstrap, with the image's two fixed paths pointed at this machine's: header-stamp runs."""
    from sidecar.inprocess.module import envoy_environment, http_filter

    backend = EchoBackend().start()
    try:
        host, port = backend.address
        docs = render(VALUES, sets={"standalone.upstream.host": host, "standalone.upstream.port": str(port)})
        config = next(d for d in docs if d["kind"] == "ConfigMap" and "sidecar.yaml" in d["data"])["data"]
        (tmp_path / "sidecar.yaml").write_text(config["sidecar.yaml"])
        bootstrap = _bootstrap(docs)
        for listener in bootstrap["static_resources"]["listeners"]:
            listener["address"]["socket_address"]["port_value"] = 0
        ours = _http_filters(bootstrap)[0]["typed_config"]["filter_config"]
        here = json.loads(http_filter(tmp_path / "sidecar.yaml", "default")["typed_config"]["filter_config"]["value"])
        loaded = json.loads(ours["value"])
        ours["value"] = json.dumps({**loaded, "config": here["config"], "site": here["site"]})
        with Envoy(bootstrap, workdir=tmp_path / "envoy", env=envoy_environment()) as envoy:
            lhost, lport = envoy.listener_address("main")
            with urllib.request.urlopen(f"http://{lhost}:{lport}/hello", timeout=10) as resp:
                echoed = json.loads(resp.read())
            assert echoed["headers"]["x-stamped-by"] == "envoy-sidecar"
            rhost, rport = envoy.listener_address("ready")
            with urllib.request.urlopen(f"http://{rhost}:{rport}/ready", timeout=10) as resp:
                assert resp.status == 200
    finally:
        backend.stop()
