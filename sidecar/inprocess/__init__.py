"""The in-process backend: the same plugins and config, run inside Envoy through a dynamic module.

`native/` is the C module Envoy loads (`libsidecar_inprocess.so`, built at install); `module.py` finds it and
writes the Envoy filter entry that loads it. The Python side the module calls is the bridge's.
"""
