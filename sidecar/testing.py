"""Test helpers for plugin authors.

* `Driver`: runs a chain in-process through the server's own stream code and plays Envoy's part
  (which messages it sends in the chain's processing mode, how it applies the answers, its default
  header mutation rules). Fast: no sockets, no processes.

      driver = Driver([MyPlugin({"limit": 10})])
      result = driver.run(Request("POST", "/x", {"content-type": "application/json"}, b"{}"))
      assert result.upstream.headers["x-added"] == "yes"

* `EnvoyHarness` and the pytest fixture `sidecar_envoy`: the real thing, a real Envoy and
  `sidecar serve` on a temporary socket and free loopback ports, in front of the echo backend (or a
  given upstream). Logs of both are attached to the test report when a test fails.

      def test_real(sidecar_envoy):
          env = sidecar_envoy(plugins=["header-stamp"])
          assert httpx.get(env.url + "/").headers["server-timing"]

This module is registered as a pytest plugin (entry point `pytest11`), so the fixture is available
wherever envoy-sidecar is installed. It imports nothing heavy until used.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sidecar.plugins import Plugin
    from sidecar.registry import Registry
    from sidecar.runtime.demo import EchoBackend
    from sidecar.runtime.envoy import Envoy
    from sidecar.runtime.extproc import SidecarProcess

__all__ = ["Driver", "EnvoyHarness", "Request", "Response", "Result", "sidecar_envoy"]

HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]]

# Envoy's default HeaderMutationRules: these changes are silently ignored unless the filter allows them.
_PROTECTED_SET = (":method", ":authority", ":scheme", "host")
_PROTECTED_PREFIX = "x-envoy"


def _pairs(headers: HeaderInput) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k.lower(), v) for k, v in items]


@dataclass
class Request:
    method: str = "GET"
    path: str = "/"
    headers: HeaderInput = ()
    body: bytes = b""
    trailers: HeaderInput = ()
    authority: str = "example.test"


@dataclass
class Response:
    status: int = 200
    headers: HeaderInput = ()
    body: bytes = b""
    trailers: HeaderInput = ()


@dataclass
class Message:
    """Headers (a case-insensitive view), body and trailers as one side of the exchange saw them."""

    headers: Any
    body: bytes = b""
    trailers: Any = None


@dataclass
class Result:
    """What Envoy would have done: what the upstream got (None if answered early) and the client got."""

    upstream: Message | None
    response: Message
    status: int
    immediate: bool
    dynamic_metadata: dict[str, Any] = field(default_factory=dict)
    rejected_mutations: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)


class Driver:
    """Drive a plugin chain in-process, exactly as the server does, with Envoy's side simulated."""

    def __init__(
        self,
        plugins: Sequence[Plugin] | Registry,
        *,
        on_error: str = "fail_closed",
        chain: str | None = None,
    ) -> None:
        from sidecar.registry import Chain, Registry

        self.registry = plugins if isinstance(plugins, Registry) else Registry([Chain("default", plugins, on_error)])
        self.chain_name = chain

    @classmethod
    def from_config(cls, path: str | Path, chain: str | None = None) -> Driver:
        from sidecar.config import load_config
        from sidecar.registry import Registry

        return cls(Registry.from_specs(load_config(path).chains), chain=chain)

    def run(self, request: Request, response: Response | None = None) -> Result:
        """Synchronous `exchange` for plain test functions."""
        return asyncio.run(self.exchange(request, response))

    async def exchange(self, request: Request, response: Response | None = None) -> Result:
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        from sidecar.extproc.stream import StreamProcessor
        from sidecar.headers import Headers

        chain = self.registry.chain(self.chain_name)
        if chain is None:
            raise KeyError(f"no chain named {self.chain_name!r}")
        override = chain.mode if chain.mode != self.registry.mode else None
        processor = StreamProcessor(chain, override)
        mode = self.registry.mode
        result = Result(upstream=None, response=Message(Headers()), status=0, immediate=False)

        async def send(kind: str, **fields: Any) -> Any:
            result.phases.append(kind)
            answer = await processor.process(pb.ProcessingRequest(**{kind: fields}))
            assert answer is not None
            for namespace, values in answer.dynamic_metadata.items():
                result.dynamic_metadata.setdefault(namespace, {}).update(_struct_to_python(values))
            which = answer.WhichOneof("response")
            if which == "immediate_response":
                return answer.immediate_response
            if which != kind:
                raise AssertionError(f"spurious response {which} to {kind}: Envoy would fail the stream")
            return answer

        req_headers = Headers(
            [(":method", request.method), (":path", request.path), (":authority", request.authority),
             (":scheme", "http"), *_pairs(request.headers)]
        )  # fmt: skip
        if "x-request-id" not in req_headers:
            req_headers["x-request-id"] = "00000000-0000-4000-8000-000000000000"
        body = request.body
        answer = await send(
            "request_headers", headers=req_headers.to_header_map(), end_of_stream=not body and not request.trailers
        )
        if _immediate(answer, result):
            return result
        _apply(answer.request_headers.response.header_mutation, req_headers, result, request=True)
        if answer.HasField("mode_override"):
            mode = answer.mode_override
        if body and mode.request_body_mode:
            answer = await send("request_body", body=body, end_of_stream=not request.trailers)
            if _immediate(answer, result):
                return result
            common = answer.request_body.response
            body = _new_body(common, body)
            _apply(common.header_mutation, req_headers, result, request=True)
        req_trailers = Headers(_pairs(request.trailers))
        if request.trailers and mode.request_trailer_mode == 1:
            answer = await send("request_trailers", trailers=req_trailers.to_header_map())
            _apply(answer.request_trailers.header_mutation, req_trailers, result, request=True)
        result.upstream = Message(req_headers, body, req_trailers)

        response = response or Response()
        resp_headers = Headers([(":status", str(response.status)), *_pairs(response.headers)])
        resp_body = response.body
        if mode.response_header_mode == 1:
            answer = await send("response_headers", headers=resp_headers.to_header_map(), end_of_stream=not resp_body)
            if _immediate(answer, result):
                return result
            _apply(answer.response_headers.response.header_mutation, resp_headers, result, request=False)
        if resp_body and mode.response_body_mode:
            answer = await send("response_body", body=resp_body, end_of_stream=not response.trailers)
            if _immediate(answer, result):
                return result
            common = answer.response_body.response
            resp_body = _new_body(common, resp_body)
            _apply(common.header_mutation, resp_headers, result, request=False)
        resp_trailers = Headers(_pairs(response.trailers))
        if response.trailers and mode.response_trailer_mode == 1:
            answer = await send("response_trailers", trailers=resp_trailers.to_header_map())
            _apply(answer.response_trailers.header_mutation, resp_trailers, result, request=False)
        result.status = int(resp_headers[":status"])
        result.response = Message(resp_headers, resp_body, resp_trailers)
        return result


def _struct_to_python(value: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    out: dict[str, Any] = json_format.MessageToDict(value)
    return out


def _immediate(answer: Any, result: Result) -> bool:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from sidecar.headers import Headers

    if not isinstance(answer, pb.ImmediateResponse):
        return False
    headers = Headers([(":status", str(answer.status.code))])
    _apply(answer.headers, headers, result, request=False)
    result.immediate = True
    result.status = answer.status.code
    result.response = Message(headers, answer.body)
    return True


def _new_body(common: Any, body: bytes) -> bytes:
    if common.HasField("body_mutation"):
        if common.body_mutation.WhichOneof("mutation") == "clear_body":
            return b""
        if common.body_mutation.WhichOneof("mutation") == "body":
            return bytes(common.body_mutation.body)
    return body


def _apply(mutation: Any, headers: Any, result: Result, *, request: bool) -> None:
    """Apply a HeaderMutation the way Envoy does with default mutation rules."""
    for option in mutation.set_headers:
        name = option.header.key.lower()
        value = option.header.raw_value or option.header.value.encode()
        if name.startswith(_PROTECTED_PREFIX) or (request and name in _PROTECTED_SET):
            result.rejected_mutations.append(f"set {name}")
            continue
        action = option.append_action
        if action == 0:  # APPEND_IF_EXISTS_OR_ADD
            headers.append(name, value)
        elif action == 2 or (action == 1 and name not in headers) or (action == 3 and name in headers):
            headers[name] = value  # OVERWRITE_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS
    for name in mutation.remove_headers:
        if name.startswith((":", _PROTECTED_PREFIX)) or name == "host":
            result.rejected_mutations.append(f"remove {name}")
            continue
        headers.remove(name)


# -- real Envoy harness ---------------------------------------------------------------------------------


class EnvoyHarness:
    """Real Envoy + `sidecar serve` (+ the echo backend unless `upstream` is given), all on loopback."""

    def __init__(
        self,
        *,
        config: str | Path | None = None,
        plugins: Sequence[str] = (),
        upstream: tuple[str, int] | None = None,
        routes: Sequence[str] = (),
        workers: int = 1,
        serve_args: Sequence[str] = (),
        workdir: Path | None = None,
    ) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="sidecar-harness-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.config = config
        self.plugins = list(plugins)
        self.upstream = upstream
        self.routes = list(routes)
        self.workers = workers
        self.serve_args = list(serve_args)
        self.backend: EchoBackend | None = None
        self.sidecar: SidecarProcess | None = None
        self.envoy: Envoy | None = None
        self.url = ""
        self.bootstrap: dict[str, Any] = {}

    def _source_args(self) -> list[str]:
        args = ["-c", str(self.config)] if self.config else []
        for plugin in self.plugins:
            args += ["--plugin", plugin]
        return args

    def start(self) -> EnvoyHarness:
        import argparse

        from sidecar.extproc.commands import resolve
        from sidecar.runtime.demo import EchoBackend
        from sidecar.runtime.envoy import Envoy
        from sidecar.runtime.extproc import SidecarProcess
        from sidecar.translate.bootstrap import LISTENER_NAME, BootstrapOptions, build_bootstrap, parse_route

        socket = self.workdir / "sock" / "extproc.sock"
        listen = f"unix:{socket}"
        ns = argparse.Namespace(config=self.config, plugin=self.plugins, listen=listen, workers=self.workers)
        config, registry = resolve(ns)
        if self.upstream is None:
            self.backend = EchoBackend().start()
            self.upstream = self.backend.address
        routes = tuple(parse_route(r) for r in self.routes) if self.routes else BootstrapOptions().routes
        self.bootstrap = build_bootstrap(
            registry, config, BootstrapOptions(listen_port=0, upstream=self.upstream, routes=routes)
        )
        self.sidecar = SidecarProcess(
            [*self._source_args(), "--listen", listen, "--workers", str(self.workers), *self.serve_args],
            config.socket_paths(),
            log_path=self.workdir / "sidecar.log",
        ).start()
        self.envoy = Envoy(self.bootstrap, workdir=self.workdir / "envoy").start()
        host, port = self.envoy.listener_address(LISTENER_NAME)
        self.url = f"http://{host}:{port}"
        self.sockets = config.socket_paths()
        return self

    def logs(self) -> str:
        parts = []
        if self.sidecar is not None:
            parts.append("---- sidecar ----\n" + self.sidecar.logs())
        if self.envoy is not None:
            parts.append("---- envoy ----\n" + self.envoy.logs())
        return "\n".join(parts)

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.close()
        if self.sidecar is not None:
            self.sidecar.close()
        if self.backend is not None:
            self.backend.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EnvoyHarness:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_HARNESSES = pytest.StashKey[list[EnvoyHarness]]()


@pytest.fixture
def sidecar_envoy(request: pytest.FixtureRequest) -> Iterator[Callable[..., EnvoyHarness]]:
    """A factory: `sidecar_envoy(plugins=[...] | config=PATH, routes=[...], workers=N)` -> started harness."""
    started: list[EnvoyHarness] = []
    request.node.stash[_HARNESSES] = started

    def factory(**kwargs: Any) -> EnvoyHarness:
        harness = EnvoyHarness(**kwargs)
        started.append(harness)
        return harness.start()

    yield factory
    for harness in started:
        harness.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        harnesses: list[EnvoyHarness] = item.stash.get(_HARNESSES, [])
        for i, harness in enumerate(harnesses):
            report.sections.append((f"envoy-sidecar harness {i} logs", harness.logs()[-20000:]))
    return report
