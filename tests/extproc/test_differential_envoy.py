"""The differential suite: generated plugin actions through the Driver and through real Envoy + sidecar must
show a user the same thing (docs/testing.md, "Differential runs"). One Envoy and one sidecar serve every
chain of a batch; FULL_DUPLEX_STREAMED chains get their own (they make the whole filter FULL_DUPLEX)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.chains import Registry
from sidecar.config import load_config
from sidecar.testing import EnvoyHarness
from tests.support import differential as diff

pytestmark = pytest.mark.envoy

SEED = 14
COUNT = 240


@pytest.mark.parametrize("duplex", [False, True], ids=["chains", "full-duplex"])
def test_driver_and_envoy_agree_on_generated_plugin_actions(
    sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path, duplex: bool
) -> None:
    chains = diff.DUPLEX_CHAINS if duplex else diff.CHAINS
    cases = [c for c in diff.generate(SEED, COUNT) if (c.chain in diff.DUPLEX_CHAINS) == duplex]
    config = tmp_path / "sidecar.yaml"
    config.write_text(diff.sidecar_config(chains))
    log = tmp_path / "access.log"
    upstream = diff.RecordingUpstream().start()
    try:
        env = sidecar_envoy(
            config=config,
            upstream=upstream.address,
            routes=[f"/{name}/={name}" for name in chains],
            bootstrap_hook=diff.access_log_hook(log),
        )
        registry = Registry.from_specs(load_config(config).chains)
        tally = diff.run_batch(cases, env, upstream, log, registry)
    finally:
        upstream.stop()
    report = "\n".join(f"{case.ident} {case.chain} {case.shape} {case.script}: {p}" for case, p in tally.disagreements)
    print(f"differential ({'full-duplex' if duplex else 'chains'}): {tally.cases} cases, {tally.agreed} agreed")
    assert tally.cases >= (25 if duplex else 150)
    assert not tally.disagreements, report
