"""Where the in-process backend's native module is, and the Envoy filter config that loads it.

Envoy 1.40 finds a dynamic module by name in `$ENVOY_DYNAMIC_MODULES_SEARCH_PATH` (file `lib<name>.so`); the
filter config is a JSON string the module reads at config load (its keys are in docs/design/in-process-backend.md).
"""

from __future__ import annotations

import json
import site
import sys
from pathlib import Path
from typing import Any

from sidecar.errors import InProcessUnavailable

__all__ = [
    "DEFAULT_HOOK_DEADLINE_MS",
    "DEFAULT_MAX_BODY_BYTES",
    "FACTORY",
    "MODULE_NAME",
    "envoy_environment",
    "filter_config",
    "http_filter",
    "module_search_path",
]

#: The Envoy module name: Envoy loads `libsidecar_inprocess.so`.
MODULE_NAME = "sidecar_inprocess"
#: What the native module calls at config load (the bridge's entry point).
FACTORY = "sidecar.inprocess.bridge:configure"
#: How long one inline hook may run before the native watchdog interrupts its Python code.
DEFAULT_HOOK_DEADLINE_MS = 1000
#: The largest body (or chunk) copied between Envoy and Python, either way.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: The memory the embedded interpreter may hold, all its threads together; past it an allocation fails
#: (MemoryError in the hook, then the chain's failure policy). The native module refuses less than 32 MiB.
DEFAULT_MAX_PYTHON_BYTES = 512 * 1024 * 1024

_NATIVE_DIR = Path(__file__).resolve().parent / "native"
_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
_STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"


def module_search_path() -> Path:
    """The directory holding `libsidecar_inprocess.so`, for `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`."""
    if not (_NATIVE_DIR / f"lib{MODULE_NAME}.so").is_file():
        raise InProcessUnavailable(
            "the in-process backend is not installed: reinstall envoy-sidecar with a Python built with a shared "
            "libpython (--enable-shared) and gcc"
        )
    return _NATIVE_DIR


def envoy_environment() -> dict[str, str]:
    """The environment variables Envoy needs to load the module."""
    return {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module_search_path())}


def _site_dirs() -> list[str]:
    """The directories the embedded interpreter needs beyond its standard library: this environment's
    site-packages (added with `site.addsitedir`, which also runs the .pth files an editable install relies on)
    and the other absolute sys.path entries outside the base Python."""
    base = Path(sys.base_prefix).resolve()
    dirs = [*site.getsitepackages()]
    for entry in sys.path:
        if not entry or not Path(entry).is_dir():
            continue
        resolved = Path(entry).resolve()
        if resolved != base and base not in resolved.parents:
            dirs.append(str(resolved))
    return list(dict.fromkeys(dirs))


def filter_config(
    config_path: Path,
    chain: str,
    *,
    hook_deadline_ms: int = DEFAULT_HOOK_DEADLINE_MS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_python_bytes: int = DEFAULT_MAX_PYTHON_BYTES,
    factory: str = FACTORY,
) -> str:
    """The filter config JSON the native module reads at config load."""
    return json.dumps(
        {
            "factory": factory,
            "config": str(Path(config_path).resolve()),
            "chain": chain,
            "site": _site_dirs(),
            "hook_deadline_ms": hook_deadline_ms,
            "max_body_bytes": max_body_bytes,
            "max_python_bytes": max_python_bytes,
        }
    )


def http_filter(
    config_path: Path,
    chain: str,
    *,
    hook_deadline_ms: int = DEFAULT_HOOK_DEADLINE_MS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_python_bytes: int = DEFAULT_MAX_PYTHON_BYTES,
    factory: str = FACTORY,
) -> dict[str, Any]:
    """The whole `http_filters` entry that runs `chain` of the sidecar config at `config_path` inside Envoy.

    `do_not_close`: an initialised CPython cannot be unloaded, so Envoy must never dlclose the module."""
    module_search_path()  # fail here, in one line, rather than in Envoy's log
    return {
        "name": f"sidecar.inprocess.{chain}",
        "typed_config": {
            "@type": _FILTER_TYPE,
            "dynamic_module_config": {"name": MODULE_NAME, "do_not_close": True},
            "filter_name": chain,
            "filter_config": {
                "@type": _STRING_VALUE,
                "value": filter_config(
                    config_path,
                    chain,
                    hook_deadline_ms=hook_deadline_ms,
                    max_body_bytes=max_body_bytes,
                    max_python_bytes=max_python_bytes,
                    factory=factory,
                ),
            },
        },
    }
