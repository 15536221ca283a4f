from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# `sidecar serve` subprocesses import test plugins as tests.support.testplugins:NAME.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

# The Wasm cache root (`sidecar.wasm.cache_root()`, read at each call, by subprocesses through the
# environment): a directory of this session, never the user's ~/.cache/sidecar/wasm. Set at import, before
# any test or fixture starts a process; mkdtemp makes it 0700, as the compiled cache under it must be.
# A root the caller chose (SIDECAR_WASM_CACHE already set) is kept, and so are the tests' own.
_SESSION_WASM_CACHE = None if os.environ.get("SIDECAR_WASM_CACHE") else tempfile.mkdtemp(prefix="sidecar-wasm-cache-")
if _SESSION_WASM_CACHE is not None:
    os.environ["SIDECAR_WASM_CACHE"] = _SESSION_WASM_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_WASM_CACHE is not None:
        shutil.rmtree(_SESSION_WASM_CACHE, ignore_errors=True)
