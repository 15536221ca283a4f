"""The native module as installed: where it is, what it links and exports, that every Envoy callback it calls
exists in the wheel's Envoy binary, the filter entry that loads it, and what happens without it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from sidecar.errors import InProcessUnavailable
from sidecar.inprocess import module
from sidecar.stack.envoy import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = "libsidecar_inprocess.so"

needs_binutils = pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None, reason="binutils")


def _setup_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sidecar_setup_script", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _symbols(path: str, *flags: str) -> set[str]:
    out = subprocess.run(["nm", "-D", *flags, path], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_the_installed_module_is_where_envoy_is_told_to_look() -> None:
    directory = module.module_search_path()
    assert (directory / LIBRARY).is_file()
    assert module.envoy_environment() == {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(directory)}


@needs_binutils
def test_every_envoy_callback_the_module_calls_is_exported_by_the_wheels_envoy() -> None:
    """The ABI version check in Envoy is advisory: this is the check that a renamed or removed callback fails."""
    library = str(module.module_search_path() / LIBRARY)
    binary = envoy_binary()
    if Path(binary).read_bytes()[:2] == b"#!":  # the wheel's launcher script: the binary is in envoy/_bin
        import envoy

        binary = str(Path(envoy.__file__).parent / "_bin" / "envoy")
    wanted = {s for s in _symbols(library, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    assert len(wanted) >= 15
    assert wanted - _symbols(binary, "--defined-only") == set()
    hooks = {s for s in _symbols(library, "--defined-only") if s.startswith("envoy_dynamic_module_on_")}
    assert {"envoy_dynamic_module_on_program_init", "envoy_dynamic_module_on_http_filter_scheduled"} <= hooks
    assert "envoy_dynamic_module_on_http_filter_http_callout_done" in hooks  # Envoy 1.40 refuses a module without it


@needs_binutils
def test_the_module_links_this_pythons_shared_libpython_with_an_rpath() -> None:
    dynamic = subprocess.run(
        ["readelf", "-d", str(module.module_search_path() / LIBRARY)], capture_output=True, text=True, check=True
    ).stdout
    assert sysconfig.get_config_var("INSTSONAME") in dynamic
    assert sysconfig.get_config_var("LIBDIR") in dynamic  # RUNPATH: Envoy's process has no LD_LIBRARY_PATH for it
    assert "BIND_NOW" in dynamic or "NOW" in dynamic


def test_the_filter_entry_loads_the_module_by_name_with_the_config_json(tmp_path: Path) -> None:
    entry = module.http_filter(tmp_path / "sidecar.yaml", "default", hook_deadline_ms=250)
    typed = entry["typed_config"]
    assert typed["@type"].endswith("dynamic_modules.v3.DynamicModuleFilter")
    assert typed["dynamic_module_config"] == {"name": "sidecar_inprocess", "do_not_close": True}
    config = json.loads(typed["filter_config"]["value"])
    assert config["factory"] == "sidecar.inprocess.bridge:configure"
    assert config["config"] == str((tmp_path / "sidecar.yaml").resolve())
    assert (config["chain"], config["hook_deadline_ms"]) == ("default", 250)
    assert config["max_body_bytes"] == module.DEFAULT_MAX_BODY_BYTES
    # The embedded interpreter gets this environment's site-packages (its .pth files make editable installs work).
    assert any(Path(p) == Path(sysconfig.get_paths()["purelib"]) for p in config["site"])
    assert all(Path(p).is_absolute() for p in config["site"])


def test_without_the_built_module_one_line_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(module, "_NATIVE_DIR", tmp_path)
    for ask in (module.module_search_path, module.envoy_environment, lambda: module.http_filter(tmp_path, "c")):
        with pytest.raises(InProcessUnavailable) as caught:
            ask()
        message = str(caught.value)
        assert "\n" not in message and "shared libpython" in message


def test_a_python_without_a_shared_libpython_skips_the_extension(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _setup_script()
    assert [ext.name for ext in script.native_extensions()] == ["sidecar.inprocess.native.libsidecar_inprocess"]
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: 0 if name == "Py_ENABLE_SHARED" else real(name))
    assert script.native_extensions() == []
    assert capsys.readouterr().err.count("\n") == 1


def test_a_wheel_carries_the_built_module_and_its_sources(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert f"sidecar/inprocess/native/{LIBRARY}" in names
    assert "sidecar/inprocess/module.py" in names
