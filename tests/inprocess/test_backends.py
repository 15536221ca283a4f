"""Both backends, the same results, real Envoy: every generated case of the differential suite
(tests/support/differential.py) goes through Envoy + `sidecar serve` (ext_proc) and through Envoy running the same
config in-process (the dynamic-module filter), and the client and the upstream must see the same status, headers,
body and metadata. One Envoy per backend serves all the chains of a batch, each route its own chain."""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.testing import EnvoyHarness
from tests.support import differential as diff
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.envoy,
    # The module embeds the running Python through its shared libpython: a static build has none to link.
    pytest.mark.skipif(not sysconfig.get_config_var("Py_ENABLE_SHARED"), reason="this Python has no libpython.so"),
]

SEED = 17
COUNT = 240


@dataclass
class Backend:
    """One started Envoy (ext_proc or in-process) for a batch, with its access log and HTTP clients."""

    env: EnvoyHarness
    log: Path
    clients: dict[str, httpx.Client] = field(default_factory=dict)


@dataclass
class Comparison:
    cases: int = 0
    agreed: int = 0
    races: int = 0
    differences: list[tuple[diff.Case, list[str]]] = field(default_factory=list)


def _start(
    start: Callable[..., EnvoyHarness],
    stack: ExitStack,
    workdir: Path,
    config: Path,
    upstream: Any,
    chains: Any,
    **kw: Any,
) -> Backend:
    log = workdir / "access.log"
    env = start(
        config=config,
        upstream=upstream.address,
        routes=[f"/{name}/={name}" for name in chains],
        bootstrap_hook=diff.access_log_hook(log),
        **kw,
    )
    backend = Backend(env, log)
    for name, h2 in (("h1", False), ("h2", True)):
        client = httpx.Client(base_url=env.url, timeout=20, http1=not h2, http2=h2)
        backend.clients[name] = stack.enter_context(client)
    return backend


def _logged(log: Path, count: int) -> Callable[[], bool]:
    return lambda: len(diff.read_access_log(log)) >= count


def compare_backends(
    cases: list[diff.Case], duplex: bool, workdir: Path, start: Callable[..., EnvoyHarness]
) -> Comparison:
    chains = diff.DUPLEX_CHAINS if duplex else diff.CHAINS
    cases = [case for case in cases if (case.chain in diff.DUPLEX_CHAINS) == duplex]
    config = workdir / "sidecar.yaml"
    config.write_text(diff.sidecar_config(chains))
    upstream = diff.RecordingUpstream().start()
    observed: list[tuple[diff.Case, diff.Observation, diff.Observation]] = []
    with ExitStack() as stack:
        stack.callback(upstream.stop)
        (workdir / "extproc").mkdir()
        (workdir / "inprocess").mkdir()
        extproc = _start(start, stack, workdir / "extproc", config, upstream, chains)
        inprocess = _start(start, stack, workdir / "inprocess", config, upstream, chains, in_process=True)
        for case in cases:
            ours = diff.observe_envoy(extproc.clients, extproc.env, upstream, case)
            theirs = diff.observe_envoy(inprocess.clients, inprocess.env, upstream, case)
            observed.append((case, ours, theirs))
        for log in (extproc.log, inprocess.log):
            wait_for(_logged(log, len(cases)), 20, f"{len(cases)} lines in {log}")
        metadata = [diff.read_access_log(backend.log) for backend in (extproc, inprocess)]
        for case, ours, theirs in observed:
            ours.metadata, theirs.metadata = (logged.get(case.ident, {}) for logged in metadata)
    result = Comparison()
    for case, ours, theirs in observed:
        streams = case.chain in diff.STREAMING_CHAINS
        problems = diff.compare(ours, theirs, streams_response=streams)
        result.cases += 1
        if problems:
            result.differences.append((case, problems))
        else:
            result.agreed += 1
            result.races += streams and ours.cut != theirs.cut
    return result


def _report(result: Comparison) -> str:
    """The differences, one case a line; `compare` names the ext_proc side "driver" and the in-process "envoy"."""
    lines = [f"{case.ident} {case.chain} {case.shape} {case.script}: {p}" for case, p in result.differences]
    return "ext_proc is 'driver', in-process is 'envoy' below\n" + "\n".join(lines)


@pytest.mark.parametrize("duplex", [False, True], ids=["chains", "full-duplex"])
def test_extproc_and_inprocess_agree_on_generated_plugin_actions(
    sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path, duplex: bool
) -> None:
    result = compare_backends(diff.generate(SEED, COUNT), duplex, tmp_path, sidecar_envoy)
    kind = "full-duplex" if duplex else "chains"
    print(f"backends ({kind}): {result.cases} cases, {result.agreed} agreed ({result.races} by a race in Envoy)")
    assert result.cases >= (20 if duplex else 180)
    assert not result.differences, _report(result)
