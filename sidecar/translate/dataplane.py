"""envoy-data-plane's import, with its upstream deprecation warnings kept inside the project.

envoy-data-plane 2.2's generated models decorate classmethods with `@model_validator(mode="after")`,
which pydantic 2.12 deprecates: every model module warns when it is first imported. Those warnings are
not the user's to act on, and under `-W error` (pytest's `filterwarnings = error`, common in plugin
authors' projects) they would turn the first config write into an exception. A filter in the user's
config is the wrong place, and a process-wide `warnings.filterwarnings` loses to the filters pytest
installs around each test. So the modules themselves load inside `warnings.catch_warnings()` with this
one warning ignored: a finder on `sys.meta_path` wraps only `envoy_data_plane.*` loaders. Every other
warning, theirs included, still reaches the user.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

__all__ = ["keep_warnings_inside"]

_PACKAGE = "envoy_data_plane"
_DEPRECATION = r"Using `@model_validator` with mode='after' on a classmethod"


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:  # resource readers and the like: the real loader's
        return getattr(self._inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
            self._inner.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _PACKAGE and not fullname.startswith(_PACKAGE + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def keep_warnings_inside() -> None:
    """Install the finder once, ahead of the standard ones (idempotent; imports nothing heavy)."""
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
