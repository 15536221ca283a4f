"""HTTPRoute header modifiers as EG decides them: which values and names refuse the route, and which repeats win.

The values are what a route's author controls: control characters and CRLF (header injection), non-ASCII,
leading/trailing/double whitespace, empty; the Host header in any case, in add, set and remove.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.errors import ConfigError
from sidecar.translate.options import RenderOptions
from sidecar.translate.render import render_bootstrap
from sidecar.translate.resources import ResourceSet, parse_document
from sidecar.translate.rules import validate
from tests.support.translate_kit import BASE


def _route_with(filters: list[dict[str, Any]]) -> str:
    docs = [d for d in yaml.safe_load_all(BASE) if d]
    docs[1]["spec"]["rules"][0]["filters"] = filters
    return yaml.safe_dump_all(docs)


def _validate(text: str) -> None:
    validate(ResourceSet(parse_document(d, f"in#{i}") for i, d in enumerate(yaml.safe_load_all(text)) if d))


@pytest.mark.parametrize("direction", ["request", "response"])
@pytest.mark.parametrize(
    ("verb", "entry", "field"),
    [
        ("set", {"name": "x-a", "value": ""}, "value"),
        ("add", {"name": "x-a", "value": " leading"}, "value"),
        ("set", {"name": "x-a", "value": "trailing "}, "value"),
        ("add", {"name": "x-a", "value": "two  spaces"}, "value"),
        ("set", {"name": "x-a", "value": "a\r\nx-injected: 1"}, "value"),
        ("add", {"name": "x-a", "value": "nul\x00byte"}, "value"),
        ("set", {"name": "x-a", "value": "caf\u00e9"}, "value"),
        ("set", {"name": "Host", "value": "evil.example.com"}, "name"),
        ("add", {"name": "HOST", "value": "evil.example.com"}, "name"),
        ("remove", "host", ""),
    ],
)
def test_a_value_or_name_eg_refuses_refuses_the_route(direction: str, verb: str, entry: Any, field: str) -> None:
    kind = f"{direction.title()}HeaderModifier"
    spec = f"{direction}HeaderModifier"
    filters: list[dict[str, Any]] = [{"type": kind, spec: {"set": [{"name": "x-ok", "value": "fine"}], verb: [entry]}}]
    if verb == "set":
        filters[0][spec]["set"] = [entry]
    with pytest.raises(ConfigError) as refused:
        _validate(_route_with(filters))
    where = f"HTTPRoute/default/app: spec.rules[0].filters[0].{spec}.{verb}[0]" + (f".{field}" if field else "")
    assert where in str(refused.value)
    assert getattr(refused.value, "reason", "") == "UnsupportedValue"


@pytest.mark.parametrize("value", ["a", "a b", "a\tb", "!#$%&'*+-.^_`|~", "v=1; path=/x"])
def test_values_eg_takes(value: str) -> None:
    _validate(
        _route_with(
            [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x", "value": value}]}}]
        )
    )


def test_repeated_names_first_wins_add_before_set_as_in_eg(tmp_path: Path) -> None:
    modifier = {
        "set": [{"name": "X-One", "value": "set"}, {"name": "x-two", "value": "set"}],
        "add": [{"name": "x-one", "value": "added"}, {"name": "X-ONE", "value": "again"}],
        "remove": ["x-gone", "X-Gone"],
    }
    second = {"set": [{"name": "x-two", "value": "later"}, {"name": "x-three", "value": "3"}], "remove": ["x-gone"]}
    path = tmp_path / "in.yaml"
    path.write_text(
        _route_with(
            [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": modifier},
                {"type": "RequestHeaderModifier", "requestHeaderModifier": second},
            ]
        )
    )
    bootstrap = render_bootstrap([path], RenderOptions(ephemeral_ports=True))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    added = [
        (o["header"]["key"], o["header"]["value"], o.get("append_action", "APPEND_IF_EXISTS_OR_ADD"))
        for o in route["request_headers_to_add"]
    ]
    assert added == [
        ("x-one", "added", "APPEND_IF_EXISTS_OR_ADD"),
        ("x-two", "set", "OVERWRITE_IF_EXISTS_OR_ADD"),
        ("x-three", "3", "OVERWRITE_IF_EXISTS_OR_ADD"),
    ]
    assert route["request_headers_to_remove"] == ["x-gone"]


def _path(kind: str, **fields: str) -> dict[str, Any]:
    return {"type": kind, **fields}


@pytest.mark.parametrize(
    ("filters", "where"),
    [
        ([{"type": "URLRewrite", "urlRewrite": {"path": _path("ReplaceFullPath")}}], "urlRewrite.path.replaceFullPath"),
        (
            [
                {
                    "type": "URLRewrite",
                    "urlRewrite": {"path": _path("ReplaceFullPath", replaceFullPath="/a", replacePrefixMatch="/b")},
                }
            ],
            "urlRewrite.path.replacePrefixMatch",
        ),
        (
            [
                {
                    "type": "RequestRedirect",
                    "requestRedirect": {"path": _path("ReplacePrefixMatch", replaceFullPath="/a")},
                }
            ],
            "requestRedirect.path.replaceFullPath",
        ),
        (
            [
                {"type": "URLRewrite", "urlRewrite": {"hostname": "a.example.com"}},
                {"type": "URLRewrite", "urlRewrite": {"hostname": "b.example.com"}},
            ],
            "filters[1]",
        ),
    ],
    ids=["full-path-missing", "prefix-beside-full", "redirect-full-beside-prefix", "two-rewrites"],
)
def test_rewrites_and_redirects_eg_refuses(filters: list[dict[str, Any]], where: str) -> None:
    text = _route_with(filters)
    if filters[0]["type"] == "RequestRedirect":
        docs = [d for d in yaml.safe_load_all(text) if d]
        del docs[1]["spec"]["rules"][0]["backendRefs"]
        text = yaml.safe_dump_all(docs)
    with pytest.raises(ConfigError) as refused:
        _validate(text)
    assert f"HTTPRoute/default/app: spec.rules[0].{where}" in str(refused.value).replace("filters[0].", "")
    assert getattr(refused.value, "reason", "") == "UnsupportedValue"


@pytest.mark.parametrize("value", ["a" * 4000 + " ", "a " * 1999 + " ", "a" * 4000 + "\t\t"])
def test_a_long_value_just_short_of_the_rule_is_refused_at_once(value: str, tmp_path: Path) -> None:
    """A header value's check runs in linear time: with an optional separator, a run of letters ending in a
    space was tried every way it can be split (40 letters hung `render`). A subprocess bounds the test."""
    import subprocess
    import sys

    filters = [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": value}]}}]
    source = tmp_path / "route.yaml"
    source.write_text(_route_with(filters))
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "render", "-f", str(source)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "requestHeaderModifier.set[0].value" in done.stderr
