"""One version: `sidecar.__version__` is the source; the package metadata, the chart and the images follow it."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import yaml

import sidecar

ROOT = Path(__file__).resolve().parent.parent


def test_package_metadata_reads_the_version_from_the_code() -> None:
    assert version("envoy-sidecar") == sidecar.__version__


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((ROOT / "helm" / "envoy-sidecar" / "Chart.yaml").read_text())
    assert chart["appVersion"] == sidecar.__version__


def test_plugin_image_defaults_to_the_same_sidecar_image_version() -> None:
    dockerfile = (ROOT / "images" / "plugin-image" / "Dockerfile").read_text()
    tags = set(re.findall(r"envoy-sidecar/envoy-sidecar:(\S+)", dockerfile))
    assert tags == {sidecar.__version__}
