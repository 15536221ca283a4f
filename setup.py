"""The build step pyproject.toml cannot declare: the in-process backend's native module.

`libsidecar_inprocess.so` is the Envoy dynamic module of sidecar/inprocess/native/ (C, linked against this
Python's shared libpython with an rpath to it). Envoy loads it by that exact file name, so it is built without
Python's extension suffix. It is optional: a Python without a shared libpython (or a failed compile) skips it,
and `sidecar.inprocess.module` says so in one line when it is asked for.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = Path("sidecar") / "inprocess" / "native"
MODULE = "sidecar.inprocess.native.libsidecar_inprocess"


class BuildNative(build_ext):
    """Names the module as Envoy looks it up (`lib<name>.so`), not as a Python extension."""

    def get_ext_filename(self, fullname: str) -> str:
        # Called with the full dotted name and, by get_ext_fullpath, with its last part alone.
        if fullname in (MODULE, MODULE.rpartition(".")[2]):
            return str(Path(*fullname.split("."))) + ".so"
        return str(super().get_ext_filename(fullname))

    def get_export_symbols(self, ext: Extension) -> list[str]:
        # Not a Python extension: there is no PyInit_ to export.
        return [] if ext.name == MODULE else list(super().get_export_symbols(ext))


def native_extensions() -> list[Extension]:
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not soname:
        print(
            "envoy-sidecar: this Python has no shared libpython; the in-process backend is not built", file=sys.stderr
        )
        return []
    ldversion = sysconfig.get_config_var("LDVERSION")
    return [
        Extension(
            MODULE,
            sources=[str(NATIVE / "module.c")],
            depends=[str(NATIVE / "abi.h")],
            include_dirs=[str(NATIVE)],
            define_macros=[("SIDECAR_LIBPYTHON", f'"{soname}"')],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=default"],
            library_dirs=[libdir],
            libraries=[f"python{ldversion}"],
            # rpath: Envoy's process has no LD_LIBRARY_PATH for pyenv's lib; -z now: a callback missing from the
            # Envoy binary fails the load, not the first request that needs it.
            extra_link_args=[f"-Wl,-rpath,{libdir}", "-Wl,-z,now"],
            optional=True,
        )
    ]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for native_extensions()
    setup(ext_modules=native_extensions(), cmdclass={"build_ext": BuildNative})
