"""The pytest plugin (entry point pytest11 -> sidecar.testing) in a project that is not this one.

Each test writes a small plugin author's project into a temporary directory, with its own pytest
config and none of ours, and runs pytest there in a subprocess under `-W error`: a warning anything of
ours lets out (envoy-data-plane's pydantic deprecations, pytest-asyncio's unset loop scope, an
unregistered marker) fails that run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_TESTS = """
import asyncio

import httpx
import pytest
import pytest_asyncio

SEEN = []


@pytest.mark.envoy
def test_function_harness(sidecar_envoy):
    env = sidecar_envoy(plugins=["header-stamp"])
    assert httpx.get(env.url + "/", timeout=10).json()["headers"]["x-request-id"]


@pytest.mark.envoy
@pytest.mark.parametrize("attempt", [1, 2])
def test_session_harness_is_shared(sidecar_envoy_session, attempt):
    env = sidecar_envoy_session(plugins=["header-stamp"])
    SEEN.append(env)
    assert SEEN[0] is env
    assert httpx.get(env.url + "/", timeout=10).status_code == 200


@pytest_asyncio.fixture
async def answer():
    await asyncio.sleep(0)
    return 42


@pytest.mark.asyncio
async def test_async_fixture_runs(answer):
    assert answer == 42
"""


def _project(root: Path, extra_ini: str = "") -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text(
        '[project]\nname = "someone-elses-plugins"\nversion = "0"\n\n'
        "[tool.pytest.ini_options]\n"
        'addopts = "--strict-markers --strict-config -p no:cacheprovider"\n'
        'filterwarnings = ["error"]\n' + extra_ini
    )
    (root / "test_mine.py").write_text(_TESTS)
    return root


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTEST_ADDOPTS", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "pytest", "-W", "error", "-rA", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.envoy
def test_a_plugin_authors_project_runs_clean_under_w_error(tmp_path: Path) -> None:
    proc = _pytest(_project(tmp_path / "project"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "4 passed" in output, output
    assert "warning" not in output.lower(), output
    assert f"rootdir: {tmp_path / 'project'}" in output  # its config, not this repository's
    assert "asyncio_default_fixture_loop_scope=function" in output


def test_a_loop_scope_the_project_sets_wins(tmp_path: Path) -> None:
    project = _project(tmp_path / "project", 'asyncio_default_fixture_loop_scope = "module"\n')
    proc = _pytest(project, "--collect-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "asyncio_default_fixture_loop_scope=module" in proc.stdout
    assert "4 tests collected" in proc.stdout


@pytest.mark.envoy
def test_a_failing_test_gets_the_shared_harness_logs(tmp_path: Path) -> None:
    project = _project(tmp_path / "project")
    (project / "test_mine.py").write_text(
        "import pytest\n\n\n@pytest.mark.envoy\n"
        "def test_fails(sidecar_envoy_session):\n"
        "    sidecar_envoy_session(plugins=['header-stamp'])\n"
        "    assert False, 'on purpose'\n"
    )
    proc = _pytest(project)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "envoy-sidecar harness 0 logs" in proc.stdout
    assert "1 failed" in proc.stdout


def test_the_envoy_marker_is_registered_for_the_project(tmp_path: Path) -> None:
    proc = _pytest(_project(tmp_path / "project"), "--markers")
    assert proc.returncode == 0, proc.stderr
    assert "@pytest.mark.envoy: the test starts a real Envoy" in proc.stdout
