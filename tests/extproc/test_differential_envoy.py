"""The differential suite: generated plugin actions through the Driver and through real Envoy + sidecar must
show a user the same thing (docs/testing.md, "Differential runs"). One Envoy and one sidecar serve every
chain of a batch; FULL_DUPLEX_STREAMED chains get their own (they make the whole filter FULL_DUPLEX). The
full-size run is `python benchmarks/differential.py --seed N --count N`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.testing import EnvoyHarness
from tests.support import differential as diff

pytestmark = pytest.mark.envoy

SEED = 14
COUNT = 400  # about 340 through the chains' Envoy, 60 through the FULL_DUPLEX one


@pytest.mark.parametrize("duplex", [False, True], ids=["chains", "full-duplex"])
def test_driver_and_envoy_agree_on_generated_plugin_actions(
    sidecar_envoy: Callable[..., EnvoyHarness], tmp_path: Path, duplex: bool
) -> None:
    tally = diff.run_cases(diff.generate(SEED, COUNT), duplex, tmp_path, sidecar_envoy)
    kind = "full-duplex" if duplex else "chains"
    print(f"differential ({kind}): {tally.cases} cases, {tally.agreed} agreed ({tally.races} by a race in Envoy)")
    assert tally.cases >= (40 if duplex else 300)
    assert not tally.disagreements, diff.report(tally)


def test_the_generator_is_seeded_and_covers_every_chain_and_shape() -> None:
    first, again = diff.generate(7, 200), diff.generate(7, 200)
    assert [(c.chain, c.shape, c.script) for c in first] == [(c.chain, c.shape, c.script) for c in again]
    assert {c.chain for c in first} == set(diff.CHAINS) | set(diff.DUPLEX_CHAINS)
    assert {c.shape for c in first} == set(diff.SHAPES)
    ops = [op[0] for c in first for phase in ("request_headers", "response_headers") for op in c.script[phase]]
    assert {"set", "append", "remove", "meta", "respond", "raise"} <= set(ops)
