"""Fixture modules for the Wasm host tests: built once from npm SDKs (cached), plus WAT sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.wasm_fixtures.build import build_all, higress_module


@pytest.fixture(scope="session")
def sdk_modules() -> dict[str, Path]:
    return build_all()


@pytest.fixture(scope="session")
def higress_wasm() -> Path:
    return higress_module()


@pytest.fixture(scope="session")
def higress_data_masking() -> Path:
    """Higress' ai-data-masking plugin (Rust, ABI 0_2_100): it pauses in the request headers and reads the body."""
    return higress_module("ai-data-masking")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled-module cache shared by tests that do not measure the cache itself."""
    return tmp_path_factory.mktemp("cwasm-shared")
