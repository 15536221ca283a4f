"""What `sidecar wasm pull --json` and `ls` report: the source this pull asked for, the image layout on
cache hits too, and a reader that goes away (`ls --json | head`) ends the command quietly."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.wasm_fetch import Registry, make_module, pull_json, run


def _push(capsys: pytest.CaptureFixture[str], reg: Registry, module: Path, ref: str, creds: Path, *extra: str) -> str:
    code, out, err = run(capsys, "wasm", "push", str(module), ref, "--pull-secret", str(creds), *reg.cli_args(), *extra)
    assert code == 0, err
    return out.strip()


@pytest.mark.parametrize(("layout", "index"), [("oci", True), ("compat", True), ("docker", False)])
def test_pull_reports_the_reference_it_asked_for_and_the_layout_on_hits(
    basic_registry: Registry, layout: str, index: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "plugin.wasm"
    module.write_bytes(make_module(3000, seed=f"reports-{layout}"))
    creds = basic_registry.config_json(tmp_path / "config.json")
    repo = f"{basic_registry.host}/reports/{layout}"
    extra = ["--layout", layout, *(["--index"] if index else [])]
    pushed = _push(capsys, basic_registry, module, f"{repo}:v1", creds, *extra)
    assert _push(capsys, basic_registry, module, f"{repo}:v2", creds, *extra) == pushed  # same image, two tags
    expected_layout = "oci" if layout == "oci" else "compat"
    cache = tmp_path / "cache"
    common = ["--cache-dir", str(cache), "--pull-secret", str(creds), *basic_registry.cli_args()]

    first = pull_json(capsys, f"{repo}:v1", *common)
    assert (first["source"], first["layout"], first["cache_hit"]) == (f"{repo}:v1", expected_layout, False)
    second = pull_json(capsys, f"{repo}:v2", *common)  # resolves to the cached image: nothing downloaded
    assert (second["source"], second["layout"], second["cache_hit"]) == (f"{repo}:v2", expected_layout, True)
    pinned = pull_json(capsys, f"{repo}@{pushed}", *common)  # the index digest when there is one
    assert (pinned["source"], pinned["layout"], pinned["cache_hit"]) == (f"{repo}@{pushed}", expected_layout, True)
    fresh = pull_json(capsys, f"{repo}@{pushed}", "--cache-dir", str(tmp_path / "other"), *common[2:])
    assert (fresh["layout"], fresh["cache_hit"]) == (expected_layout, False)
    assert first["sha256"] == second["sha256"] == pinned["sha256"] == fresh["sha256"]

    code, out, err = run(capsys, "wasm", "ls", "--json", "--cache-dir", str(cache))
    assert code == 0, err
    listed = {entry["key"]: entry for entry in json.loads(out)}
    assert {entry["layout"] for entry in listed.values()} == {expected_layout}
    assert listed[f"image:{repo}:v2"]["source"] == f"{repo}:v2"
    assert listed[f"image:{repo}:v1"]["source"] == f"{repo}:v1"


def _big_cache(root: Path, entries: int) -> None:
    """A valid cache whose index points many keys at one module: `ls` prints far more than a pipe holds."""
    module = make_module(100)
    sha = hashlib.sha256(module).hexdigest()
    (root / "modules").mkdir(parents=True)
    (root / "tmp").mkdir()
    (root / "modules" / f"{sha}.wasm").write_bytes(module)
    now = time.time()
    refs = {
        f"image:registry.example.com/team/filter-{i}:v1": {
            "module": sha,
            "digest": "sha256:" + "ab" * 32,
            "source": f"registry.example.com/team/filter-{i}:v1",
            "fetched": now,
        }
        for i in range(entries)
    }
    index = {"version": 1, "modules": {sha: {"size": len(module), "last_used": now, "stamp": None}}, "refs": refs}
    (root / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("as_json", [True, False])
def test_ls_into_a_reader_that_goes_away_ends_quietly(tmp_path: Path, as_json: bool) -> None:
    _big_cache(tmp_path / "cache", 4000)
    command = [sys.executable, "-m", "sidecar", "wasm", "ls", "--cache-dir", str(tmp_path / "cache")]
    with subprocess.Popen(
        command + (["--json"] if as_json else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        head = proc.stdout.read(100)  # what `head -c 100` takes before it exits
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(60)
    assert head.startswith(b"[{" if as_json else b"")
    assert len(head) == 100
    assert err == ""  # no traceback, no "Exception ignored" from the final flush
    assert code == 141
    whole = subprocess.run([*command, "--json"], capture_output=True, timeout=60, check=False)
    assert whole.returncode == 0 and len(json.loads(whole.stdout)) == 4000
