"""Fixtures of the translator tests (defined in kit.py)."""

from tests.translate.kit import backends, run_envoy

__all__ = ["backends", "run_envoy"]
