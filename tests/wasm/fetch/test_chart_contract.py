"""The Helm chart's Wasm init container, run for real: its rendered arguments against a real registry."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.helm import CHART, helm_binary, helm_template
from tests.support.wasm_fetch import Registry, make_module, run

PATH_FLAGS = ("--cache-dir", "--output", "--pull-secret")


def test_rendered_init_container_pulls_into_the_file_envoy_loads(
    basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(6000, seed="chart")
    source = tmp_path / "plugin.wasm"
    source.write_bytes(module)
    creds = basic_registry.config_json(tmp_path / "config.json")
    ref = f"{basic_registry.host}/team/add-header:1.0.0"
    code, out, err = run(
        capsys, "wasm", "push", str(source), ref, "--pull-secret", str(creds), *basic_registry.cli_args()
    )
    assert code == 0, err
    digest = out.strip().removeprefix("sha256:")

    proc = helm_template(
        helm_binary(),
        CHART / "ci" / "eg-wasm-values.yaml",
        sets={"wasm.modules[0].image": ref, "wasm.modules[0].sha256": digest},
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    proxy = next(d for d in docs if d["kind"] == "EnvoyProxy")
    deployment = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    (init,) = [c for c in deployment["initContainers"] if c["name"].startswith("wasm-pull-")]

    # The pod's absolute paths, re-rooted under tmp_path; the secret volume holds .dockerconfigjson.
    args = list(init["args"])
    for i, arg in enumerate(args[:-1]):
        if arg in PATH_FLAGS:
            args[i + 1] = str(tmp_path / "pod" / args[i + 1].lstrip("/"))
    secret = Path(args[args.index("--pull-secret") + 1])
    secret.parent.mkdir(parents=True)
    secret.write_bytes(creds.read_bytes())
    output = Path(args[args.index("--output") + 1])
    output.parent.mkdir(parents=True, exist_ok=True)

    # Plain HTTP is the only difference from the pod: a test registry has no TLS.
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *args, *basic_registry.cli_args()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert output.read_bytes() == module
    assert hashlib.sha256(output.read_bytes()).hexdigest() in done.stdout
