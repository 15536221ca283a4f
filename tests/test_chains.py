from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar import BodyMode, Context, Plugin
from sidecar.chains import Chain, Registry, describe_mode, load_plugin_class
from sidecar.config import ChainSpec, PluginSpec
from sidecar.errors import ConfigError, PluginLoadError
from sidecar_plugins.redact import JsonRedact
from sidecar_plugins.stamp import HeaderStamp
from tests.support import testplugins as tp


def test_entry_point_and_module_attr() -> None:
    assert load_plugin_class("header-stamp") is HeaderStamp
    assert load_plugin_class("tests.support.testplugins:AddHeaders") is tp.AddHeaders


@pytest.mark.parametrize(
    ("use", "message"),
    [
        ("no-such-plugin", "unknown plugin 'no-such-plugin'"),
        ("tests.support.nope:X", "cannot import module 'tests.support.nope'"),
        ("tests.support.broken_module:X", "definitely_missing_dependency"),
        ("tests.support.testplugins:Missing", "has no attribute 'Missing'"),
        ("tests.support.testplugins:NotAPlugin", "is not a subclass of sidecar.Plugin"),
    ],
)
def test_load_errors(use: str, message: str) -> None:
    with pytest.raises(PluginLoadError, match=message):
        load_plugin_class(use)


def test_plugin_rejecting_its_config() -> None:
    with pytest.raises(PluginLoadError, match="invalid config: limit must be positive"):
        Registry.from_specs([ChainSpec("default", (PluginSpec("tests.support.testplugins:BadConfig"),))])


def test_mode_follows_hooks() -> None:
    chain = Chain("c", [tp.RequestOnly()])
    assert describe_mode(chain.mode) == {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "NONE",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    body = Chain("b", [tp.UpperBody()])
    assert describe_mode(body.mode)["request_body_mode"] == "BUFFERED"
    assert describe_mode(body.mode)["response_header_mode"] == "SEND"  # body hooks see headers too


def test_instance_can_drop_hooks() -> None:
    chain = Chain("c", [JsonRedact({"direction": "response"})])
    assert chain.hooks["request_body"] == ()
    assert describe_mode(chain.mode)["request_body_mode"] == "NONE"
    assert describe_mode(chain.mode)["response_body_mode"] == "BUFFERED"


def test_response_hooks_run_in_reverse_order() -> None:
    chain = Chain("c", [tp.AddHeaders(), tp.PidStamp(), HeaderStamp()])
    assert [h.plugin for h in chain.hooks["request_headers"]] == ["add-headers", "header-stamp"]
    assert [h.plugin for h in chain.hooks["response_headers"]] == ["header-stamp", "pid-stamp", "add-headers"]


def test_union_mode_over_chains() -> None:
    registry = Registry([Chain("a", [tp.RequestOnly()]), Chain("default", [tp.UpperBody()])])
    assert registry.default.name == "default"
    mode = describe_mode(registry.mode)
    assert mode["request_body_mode"] == "BUFFERED"
    assert mode["response_header_mode"] == "SEND"


def test_body_modes_follow_hook_kinds() -> None:
    class Chunky(Plugin):
        def on_request_chunk(self, ctx: object, chunk: bytes, end: bool) -> None:
            return None

    class Partial(Chunky):
        request_body = BodyMode.BUFFERED_PARTIAL

    class Streamy(Plugin):
        async def on_response_stream(self, ctx: object, chunks: Any) -> Any:
            async for chunk in chunks:
                yield chunk

    assert describe_mode(Chain("c", [Chunky()]).mode)["request_body_mode"] == "STREAMED"
    assert describe_mode(Chain("p", [Partial()]).mode)["request_body_mode"] == "BUFFERED_PARTIAL"
    # chunk hooks next to a whole-body hook see the whole body once
    assert describe_mode(Chain("b", [Chunky(), tp.UpperBody()]).mode)["request_body_mode"] == "BUFFERED"
    full = describe_mode(Chain("f", [Streamy()]).mode)
    assert full["response_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert full["response_trailer_mode"] == "SEND"  # Envoy requires it

    with pytest.raises(ConfigError, match="need different body modes"):
        Chain("m", [Chunky(), Partial()])
    with pytest.raises(ConfigError, match="need on_error: fail_closed"):
        Chain("o", [Streamy()], on_error="fail_open")

    class WrongDeclaration(Plugin):
        request_body = BodyMode.STREAMED

        def on_request_body(self, ctx: object, body: bytes) -> None:
            return None

    with pytest.raises(PluginLoadError, match="does not fit on_request_body"):
        Chain("w", [WrongDeclaration()])

    class NotAGenerator(Plugin):
        async def on_request_stream(self, ctx: object, chunks: Any) -> None:
            return None

    with pytest.raises(PluginLoadError, match="must be an async generator"):
        Chain("g", [NotAGenerator()])

    class Both(Chunky):
        def on_request_body(self, ctx: object, body: bytes) -> None:
            return None

    with pytest.raises(PluginLoadError, match="pick one per direction"):
        Chain("x", [Both()])

    class FullDuplexBuffered(Streamy):
        def on_response_body(self, ctx: object, body: bytes) -> None:
            return None

    with pytest.raises(PluginLoadError, match="pick one per direction"):
        Chain("y", [FullDuplexBuffered()])
    with pytest.raises(ConfigError, match="whole-body"):
        Chain("z", [Streamy(), tp.UpperBody()])


def test_full_duplex_disables_mode_override() -> None:
    class Streamy(Plugin):
        async def on_response_stream(self, ctx: object, chunks: Any) -> Any:
            async for chunk in chunks:
                yield chunk

    registry = Registry([Chain("default", [Streamy()]), Chain("light", [tp.RequestOnly()])])
    light = registry.chains["light"]
    assert registry.mode_override(light) is None
    assert registry.effective_mode(light) == registry.mode
    plain = Registry([Chain("default", [tp.UpperBody()]), Chain("light", [tp.RequestOnly()])])
    assert plain.mode_override(plain.chains["light"]) == plain.chains["light"].mode


def test_observe_only_chains_cannot_mix() -> None:
    class Observer(tp.AddHeaders):
        observe_only = True

    assert Registry([Chain("a", [Observer()])]).observe_only
    with pytest.raises(ConfigError, match="mixes observe-only"):
        Chain("m", [Observer(), tp.AddHeaders()])
    with pytest.raises(ConfigError, match="separate sidecars"):
        Registry([Chain("a", [Observer()]), Chain("b", [tp.AddHeaders()])])


def test_empty_registry_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no plugins configured"):
        Registry([])


def test_one_plugin_name_twice_is_two_plugins() -> None:
    class Streamed(Plugin):
        name = "body"
        request_body = BodyMode.STREAMED

        def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> None:
            return None

    class Partial(Streamed):
        request_body = BodyMode.BUFFERED_PARTIAL

    twins = Chain("default", [Streamed(), Streamed()])
    assert [s.plugin for s in twins.body_stages["request"]] == ["body", "body#2"]
    # Each instance's own declaration counts (the first one's used to stand for both).
    with pytest.raises(ConfigError, match="body=STREAMED, body#2=BUFFERED_PARTIAL"):
        Chain("default", [Streamed(), Partial()])


class _Reads(Plugin):
    name = "reads"
    metadata_namespaces = ("other-ns", "envoy-sidecar")
    forwarding_namespaces = ("envoy.filters.http.jwt_authn",)
    request_attributes = ("request.path", "source.address")
    response_attributes = ("response.code",)

    def on_request_headers(self, ctx: Context, headers: Any) -> None:
        ctx.set_metadata("k", 1, namespace="other-ns")


class _AlsoReads(Plugin):
    name = "also-reads"
    metadata_namespaces = ("third-ns",)
    request_attributes = ("request.path", "xds.route_name")

    def on_request_headers(self, ctx: Context, headers: Any) -> None:
        return None


def test_declarations_are_gathered_per_chain_and_for_the_filter() -> None:
    registry = Registry([Chain("a", [_Reads()]), Chain("b", [_AlsoReads(), _Reads()])])
    a = registry.chains["a"]
    assert a.metadata_namespaces == ("envoy-sidecar", "other-ns")
    assert a.writable_namespaces == frozenset({"envoy-sidecar", "other-ns"})
    assert registry.chains["b"].request_attributes == ("request.path", "xds.route_name", "source.address")
    assert registry.metadata_namespaces == ("envoy-sidecar", "other-ns", "third-ns")
    assert registry.forwarding_namespaces == ("envoy.filters.http.jwt_authn",)
    assert registry.request_attributes == ("request.path", "source.address", "xds.route_name")
    assert registry.response_attributes == ("response.code",)


def test_every_generated_envoy_config_asks_for_what_plugins_declare() -> None:
    from sidecar.config import SidecarConfig
    from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap

    registry = Registry([Chain("default", [_Reads()]), Chain("b", [_AlsoReads()])])
    bootstrap = build_bootstrap(registry, SidecarConfig(), BootstrapOptions())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy-sidecar", "other-ns", "third-ns"]
    assert ext_proc["metadata_options"]["forwarding_namespaces"]["untyped"] == ["envoy.filters.http.jwt_authn"]
    assert ext_proc["request_attributes"] == ["request.path", "source.address", "xds.route_name"]
    assert ext_proc["response_attributes"] == ["response.code"]


def test_an_undeclared_namespace_is_the_plugins_error() -> None:
    from sidecar.testing import Driver, Request

    class Writes(Plugin):
        def on_request_headers(self, ctx: Context, headers: Any) -> None:
            ctx.set_metadata("k", 1, namespace="not-declared")

    result = Driver([_Reads(), Writes()]).run(Request())
    assert result.status == 500 and result.upstream is None
    ok = Driver([_Reads()]).run(Request())
    assert ok.status == 200 and ok.dynamic_metadata == {"other-ns": {"k": 1}}
    assert type(ok.dynamic_metadata["other-ns"]["k"]) is int  # as Envoy prints it: "1", not "1.0"
    ctx = Context("c")
    with pytest.raises(ValueError, match="namespace 'x' is not declared"):
        ctx.set_metadata("k", 1, namespace="x")
    with pytest.raises(TypeError, match="the key must be a str"):
        ctx.set_metadata(3, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"metadata_namespaces": "other-ns"}, "metadata_namespaces must be a tuple of names"),
        ({"forwarding_namespaces": ("a", 3)}, "got an item int 3"),
        ({"request_attributes": ("request path",)}, "'request path' is not a name"),
        ({"response_attributes": ("",)}, "'' is not a name"),
        ({"metadata_namespaces": ("x" * 300,)}, "is not a name"),
        ({"request_attributes": tuple(f"a{i}" for i in range(65))}, "at most 64"),
        ({"metadata_namespaces": None}, "got NoneType None"),
        ({"request_attributes": {"request.path"}}, "got set of 1 items"),
        ({"forwarding_namespaces": b"ns"}, "got bytes of 2 bytes"),
        # The access log reads %DYNAMIC_METADATA(a:b)% as namespace a, key b: no ':' (nor []'") in a namespace.
        ({"metadata_namespaces": ("envoy.lb:canary",)}, "'envoy.lb:canary' is not a name"),
        ({"metadata_namespaces": ("ns)%",)}, "is not a name"),
        ({"forwarding_namespaces": ("a[0]",)}, "is not a name"),
        ({"metadata_namespaces": ("it's",)}, "is not a name"),
        ({"metadata_namespaces": ('say"',)}, "digits and ._-/\\)"),
    ],
)
def test_declarations_are_checked_at_load(attributes: dict[str, Any], message: str) -> None:
    plugin_class = type("Declares", (_AlsoReads,), attributes)
    with pytest.raises(PluginLoadError, match=message):
        Chain("c", [plugin_class()])


def test_attributes_keep_the_characters_namespaces_may_not_use() -> None:
    attributes = ("request.headers['x-tenant']", 'request.headers["a:b"]', "xds.route_metadata")
    plugin_class = type("Declares", (_AlsoReads,), {"request_attributes": attributes})
    assert Chain("c", [plugin_class()]) is not None


def _envoy_config(*args: str) -> Any:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "sidecar", "envoy-config", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_envoy_config_failure_mode_allow_and_an_access_log_with_the_plugins_metadata(tmp_path: Path) -> None:
    import yaml

    from sidecar.stack.envoy import validate_bootstrap

    log = tmp_path / "access.log"
    proc = _envoy_config("--plugin", f"{tp.TP}Framing", "--failure-mode-allow", "--access-log", str(log))
    assert proc.returncode == 0, proc.stderr
    assert "warning: --failure-mode-allow" in proc.stderr
    bootstrap = yaml.safe_load(proc.stdout)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][0]["typed_config"]["failure_mode_allow"] is True
    (entry,) = hcm["access_log"]
    assert entry["typed_config"]["path"] == str(log)
    fields = entry["typed_config"]["log_format"]["json_format"]
    assert fields["path"] == "%PATH(NQ)%"  # never the query: tokens, pre-signed URLs
    assert fields["metadata.envoy-sidecar"] == "%DYNAMIC_METADATA(envoy-sidecar)%"
    assert fields["metadata.other-ns"] == "%DYNAMIC_METADATA(other-ns)%"  # Framing declares it
    validate_bootstrap(bootstrap)  # Envoy itself accepts it

    plain = yaml.safe_load(_envoy_config("--plugin", f"{tp.TP}Framing").stdout)
    hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][0]["typed_config"].get("failure_mode_allow", False) is False
    assert "access_log" not in hcm


def test_envoy_config_refuses_fail_open_with_full_duplex_and_an_empty_log_path() -> None:
    for args, message in [
        (("--plugin", f"{tp.TP}FdPass", "--failure-mode-allow"), "FULL_DUPLEX_STREAMED cannot fail open"),
        (("--plugin", f"{tp.TP}AddHeaders", "--access-log", ""), "--access-log: expected a file path"),
    ]:
        proc = _envoy_config(*args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_render_asks_envoy_for_what_the_chains_plugins_declare(tmp_path: Path) -> None:
    from sidecar.translate.options import RenderOptions, SidecarLink
    from sidecar.translate.render import render_bootstrap
    from tests.support.translate_kit import BASE

    policy = """
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: {name: gw, annotations: {envoy-sidecar/chain: reads}}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]
  extProc:
  - backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: proc}]
    processingMode: {request: {attributes: [connection.id, request.path]}}
    metadata: {writableNamespaces: [mine]}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: proc}
spec:
  endpoints: [{unix: {path: /run/sidecar.sock}}]
"""
    path = tmp_path / "in.yaml"
    path.write_text(BASE + policy)
    registry = Registry([Chain("default", [_AlsoReads()]), Chain("reads", [_Reads()])])
    link = SidecarLink(registry, (Path("/run/sidecar.sock"),))
    bootstrap = render_bootstrap([path], RenderOptions(sidecar=link))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    # The policy's own names first, then the chain's plugins' (not the other chain's).
    assert ext_proc["request_attributes"] == ["connection.id", "request.path", "source.address"]
    assert ext_proc["response_attributes"] == ["response.code"]
    options = ext_proc["metadata_options"]
    assert options["receiving_namespaces"]["untyped"] == ["mine", "envoy-sidecar", "other-ns"]
    assert options["forwarding_namespaces"]["untyped"] == ["envoy.filters.http.jwt_authn"]


def test_the_generated_access_log_leaves_the_query_string_out_in_real_envoy(tmp_path: Path) -> None:
    import json

    import httpx

    from sidecar.chains import load_sidecar
    from sidecar.testing import EnvoyHarness
    from sidecar.translate.bootstrap import BootstrapOptions, build_bootstrap
    from tests.support.wait import wait_for

    def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
        listener = bootstrap["static_resources"]["listeners"][0]
        return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])

    log = tmp_path / "access.log"
    plugin = f"{tp.TP}AddHeaders"
    config, registry = load_sidecar(None, [plugin], listen=f"unix:{tmp_path / 'unused.sock'}", workers=1)
    (generated,) = hcm(build_bootstrap(registry, config, BootstrapOptions(access_log=str(log))))["access_log"]

    def use_generated_log(bootstrap: dict[str, Any]) -> None:
        listener = bootstrap["static_resources"]["listeners"][0]
        listener["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [generated]

    with EnvoyHarness(plugins=[plugin], bootstrap_hook=use_generated_log) as env:
        reply = httpx.get(f"{env.url}/files/report.pdf?X-Amz-Signature=s3cr3t-sig&token=s3cr3t-tok", timeout=10)
        assert reply.status_code == 200
        wait_for(lambda: log.exists() and log.read_text().strip(), 15, "the access log line")
    text = log.read_text()
    (line,) = [json.loads(raw) for raw in text.splitlines() if raw.strip()]
    assert line["path"] == "/files/report.pdf"
    assert "s3cr3t" not in text
