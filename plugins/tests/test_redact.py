from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sidecar.testing import Driver, EnvoyHarness, Request, Response
from sidecar_plugins.redact import JsonRedact

JSON = {"content-type": "application/json"}


def redact(**config: object) -> Driver:
    return Driver([JsonRedact(config)])


def test_redacts_nested_fields_case_insensitively() -> None:
    body = json.dumps({"user": "ada", "Password": "x", "cards": [{"card_number": "4111"}]}).encode()
    result = redact(fields=["password", "card_number"]).run(
        Request("POST", headers={**JSON, "content-length": str(len(body))}, body=body)
    )
    assert result.upstream is not None
    sent = json.loads(result.upstream.body)
    assert sent == {"user": "ada", "Password": "[REDACTED]", "cards": [{"card_number": "[REDACTED]"}]}
    assert result.upstream.headers["content-length"] == str(len(result.upstream.body))


def test_leaves_other_content_types_and_clean_bodies_alone() -> None:
    result = redact().run(Request("POST", headers={"content-type": "text/plain"}, body=b'{"password": "x"}'))
    assert result.upstream is not None and result.upstream.body == b'{"password": "x"}'
    clean = b'{"user": "ada"}'
    result = redact().run(Request("POST", headers=JSON, body=clean))
    assert result.upstream is not None and result.upstream.body == clean


def test_size_limit_from_header_and_from_body() -> None:
    early = redact(max_bytes=10).run(Request("POST", headers={**JSON, "content-length": "11"}, body=b"x" * 11))
    assert early.status == 413 and early.phases == ["request_headers"]
    late = redact(max_bytes=10).run(Request("POST", headers=JSON, body=b"x" * 11))  # chunked: no content-length
    assert late.status == 413 and late.phases == ["request_headers", "request_body"]


def test_oversized_response_fails_closed() -> None:
    result = redact(max_bytes=10).run(Request(), Response(headers=JSON, body=b'{"password": "leak"}'))
    assert result.status == 502
    assert b"leak" not in result.response.body


def test_invalid_json_request_is_400_response_passes() -> None:
    assert redact().run(Request("POST", headers=JSON, body=b"{nope")).status == 400
    result = redact(direction="response").run(Request(), Response(headers=JSON, body=b"{nope"))
    assert result.response.body == b"{nope"


def test_response_direction() -> None:
    result = redact(direction="response").run(
        Request("POST", headers=JSON, body=b'{"password": "in"}'),
        Response(headers=JSON, body=b'{"password": "out"}'),
    )
    assert result.upstream is not None and result.upstream.body == b'{"password": "in"}'
    assert json.loads(result.response.body) == {"password": "[REDACTED]"}


@pytest.mark.parametrize(
    ("config", "message"),
    [({"fields": "password"}, "fields"), ({"max_bytes": 0}, "max_bytes"), ({"direction": "up"}, "direction")],
)
def test_bad_config(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JsonRedact(config)


@pytest.mark.envoy
def test_through_real_envoy(sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "plugins:\n  - use: json-redact\n    config: {fields: [password], max_bytes: 100, direction: request}\n"
    )
    env = sidecar_envoy(config=config)
    ok = httpx.post(env.url + "/login", json={"user": "ada", "password": "hunter2"})
    echoed = ok.json()
    assert json.loads(echoed["body"]) == {"user": "ada", "password": "[REDACTED]"}
    assert echoed["headers"]["content-length"] == str(echoed["body_length"])
    too_big = httpx.post(env.url + "/login", json={"blob": "x" * 200})
    assert too_big.status_code == 413
    # chunked upload (no content-length): the limit applies once the body is buffered
    chunked = httpx.post(env.url + "/login", content=iter([b'{"blob": "', b"x" * 200, b'"}']), headers=JSON)
    assert chunked.status_code == 413
