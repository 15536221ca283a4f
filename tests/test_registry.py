from __future__ import annotations

import pytest

from sidecar import BodyMode, Plugin
from sidecar.config import ChainSpec, PluginSpec
from sidecar.errors import ConfigError, PluginLoadError
from sidecar.registry import Chain, Registry, describe_mode, load_plugin_class
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
        "request_header_mode": "SEND", "response_header_mode": "SKIP",
        "request_body_mode": "NONE", "response_body_mode": "NONE",
        "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
    }  # fmt: skip
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


def test_unsupported_and_conflicting_body_modes() -> None:
    class Streamy(Plugin):
        request_body = BodyMode.STREAMED

        def on_request_body(self, ctx: object, body: bytes) -> None:
            return None

    with pytest.raises(ConfigError, match="STREAMED is not supported yet"):
        Chain("s", [Streamy()])

    class Mixed(Streamy):
        request_body = BodyMode.BUFFERED_PARTIAL

    with pytest.raises(ConfigError, match="need different body modes"):
        Chain("m", [Streamy(), Mixed()])


def test_empty_registry_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no plugins configured"):
        Registry([])
