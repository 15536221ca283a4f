"""Fixtures of the translator tests (defined in tests/support/translate_kit.py)."""

from tests.support.translate_kit import backends, run_envoy

__all__ = ["backends", "run_envoy"]
