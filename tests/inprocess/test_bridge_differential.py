"""The in-process path against the ext_proc path: seeded plugin scripts (tests/support/differential.py) through
the test Driver (the ext_proc server's own processor) and through the native module's double
(tests/support/inprocess_double.py) must show a user the same thing, case by case.

Metadata is compared as it is: nested values as values, and the metadata of a phase that ends in a reply or a
failure too (the contract's RESPOND carries it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.chains import Registry
from sidecar.config import load_config
from sidecar.testing import Driver
from tests.support import differential as diff
from tests.support.inprocess_double import InProcessDouble, metadata_differences

SEEDS = (17, 1717, 424242)
CASES_PER_SEED = 150


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Driver], dict[str, InProcessDouble]]:
    config = tmp_path_factory.mktemp("differential") / "sidecar.yaml"
    config.write_text(diff.sidecar_config(diff.CHAINS))
    registry = Registry.from_specs(load_config(config).chains)
    drivers = {name: Driver(registry, chain=name) for name in diff.CHAINS}
    doubles = {name: InProcessDouble(config, name) for name in diff.CHAINS}
    return drivers, doubles


def run_seed(seed: int, drivers: dict[str, Driver], doubles: dict[str, InProcessDouble]) -> tuple[int, list[str]]:
    problems = []
    cases = diff.generate(seed, CASES_PER_SEED, duplex_share=0)
    for case in cases:
        ours = diff.observe_driver(drivers[case.chain], case)
        theirs = diff.observe_driver(doubles[case.chain], case)
        found = metadata_differences(ours.metadata, theirs.metadata)
        ours.metadata = theirs.metadata = {}
        found += diff.compare(ours, theirs)
        problems += [f"{case.ident} {case.chain} {case.shape} {case.script}: {p}" for p in found]
    return len(cases), problems


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_scripts_show_a_user_what_the_ext_proc_path_shows(
    backends: tuple[dict[str, Driver], dict[str, InProcessDouble]], seed: int
) -> None:
    count, problems = run_seed(seed, *backends)
    assert count == CASES_PER_SEED
    assert problems == [], "\n".join(problems[:20])


def test_the_chains_cover_every_body_mode_the_bridge_runs(
    backends: tuple[dict[str, Driver], dict[str, InProcessDouble]],
) -> None:
    """The comparison means something only if every native body mode (none, buffered, streamed, buffered partial)
    is in it."""
    _, doubles = backends
    modes = {(d.config.request_body_mode, d.config.response_body_mode) for d in doubles.values()}
    assert modes == {(0, 0), (1, 1), (2, 2), (3, 3)}


def test_a_full_duplex_chain_is_refused_in_one_line(tmp_path: Path) -> None:
    from sidecar.errors import ConfigError

    config = tmp_path / "duplex.yaml"
    config.write_text(diff.sidecar_config(diff.DUPLEX_CHAINS))
    with pytest.raises(ConfigError, match="FULL_DUPLEX_STREAMED bodies cannot run in-process") as caught:
        InProcessDouble(config, "d")
    assert "\n" not in str(caught.value) and str(config) in str(caught.value)
