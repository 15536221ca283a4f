"""The seeded differential scripts through real Envoy with the in-process filter (native's module, the real
bridge), against the ext_proc path's Driver: what a client and the upstream see must agree case by case, with
the documented differences normalised (tests/support/inprocess_double.py: metadata_differences).

One Envoy per chain (an in-process filter runs one chain), each in front of the recording upstream. Envoy's
ext_proc counter of rejected header mutations does not exist in-process: the bridge's own list of them is
compared with the Driver's in test_bridge_differential.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.chains import Registry
from sidecar.config import load_config
from sidecar.errors import InProcessUnavailable
from sidecar.testing import Driver
from tests.support import differential as diff
from tests.support.inprocess_double import metadata_differences
from tests.support.inprocess_envoy import InProcessEnvoy
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy

SEED = 1717
CASES = 120


class _DiffEnvoy(InProcessEnvoy):
    """InProcessEnvoy in front of a RecordingUpstream, with the differential's access log."""

    def __init__(self, chain: str, config: Path, upstream: diff.RecordingUpstream, log: Path) -> None:
        super().__init__(chain, factory="sidecar.inprocess.bridge:configure", config_path=config)
        self.backend.start().stop()  # the echo backend it made (its socket closed): the recording one serves
        self.backend = upstream  # type: ignore[assignment]  # the same start/stop/address
        self._log = log

    def _bootstrap(self, access_log: Path) -> dict[str, Any]:
        bootstrap = super()._bootstrap(access_log)
        diff.access_log_hook(self._log)(bootstrap)
        return bootstrap

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"


def _drop_empty_values(seen: Any) -> None:
    """KNOWN DIFFERENCE, found by this test: through Envoy 1.40's dynamic-module header callbacks a header set or
    added with an empty value is removed (or not added), where ext_proc keeps it with an empty value. Reported to
    the native module; until it has a way to set an empty value, empty-valued fields are left out of both sides."""
    seen.headers = [(name, value) for name, value in seen.headers if value]
    if isinstance(seen.upstream, tuple):
        method, path, headers, body = seen.upstream
        seen.upstream = (method, path, [(name, value) for name, value in headers if value], body)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("diff-envoy") / "sidecar.yaml"
    path.write_text(diff.sidecar_config(diff.CHAINS))
    return path


def _observe_chain(chain: str, cases: list[diff.Case], config: Path, workdir: Path) -> list[Any]:
    upstream = diff.RecordingUpstream()
    log = workdir / f"access-{chain}.log"
    envoy = _DiffEnvoy(chain, config, upstream, log)
    try:
        envoy.start()
    except InProcessUnavailable as exc:
        pytest.skip(str(exc))
    try:
        seen = []
        with (
            httpx.Client(base_url=envoy.url, timeout=20, http1=True, http2=False) as h1,
            httpx.Client(base_url=envoy.url, timeout=20, http1=False, http2=True) as h2,
        ):
            for case in cases:
                seen.append(diff.observe_envoy({"h1": h1, "h2": h2}, envoy, upstream, case))
        lines = envoy.module_lines()
        assert [line for line in lines if "Result" in line or "result" in line] == [], lines[:5]
    finally:
        envoy.close()  # Envoy writes its access log out as it stops (else every 10 s)
    wait_for(lambda: len(diff.read_access_log(log)) >= len(cases), 20, "an access log line per case")
    metadata = diff.read_access_log(log)
    for case, observation in zip(cases, seen, strict=True):
        observation.metadata = metadata.get(case.ident, {})
    return seen


@pytest.fixture(scope="module")
def observed(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[diff.Case, Any, Any]]]:
    registry = Registry.from_specs(load_config(config).chains)
    cases = diff.generate(SEED, CASES, duplex_share=0)
    workdir = tmp_path_factory.mktemp("diff-envoy-logs")
    out = []
    for chain in sorted(diff.CHAINS):
        mine = [case for case in cases if case.chain == chain]
        driver = Driver(registry, chain=chain)
        for case, real in zip(mine, _observe_chain(chain, mine, config, workdir), strict=True):
            out.append((case, diff.observe_driver(driver, case), real))
    yield out


def test_real_envoy_in_process_shows_what_the_ext_proc_path_shows(
    observed: list[tuple[diff.Case, Any, Any]],
) -> None:
    problems = []
    for case, ours, real in observed:
        for side in (ours, real):
            _drop_empty_values(side)
        found = metadata_differences(ours.metadata, real.metadata)
        ours.metadata = real.metadata = {}
        ours.rejected = real.rejected = 0
        found += diff.compare(ours, real, streams_response=case.chain in diff.STREAMING_CHAINS)
        problems += [f"{case.ident} {case.chain} {case.shape} {case.script}: {p}" for p in found]
    assert len(observed) == CASES
    assert problems == [], "\n".join(problems[:15])
