"""`sidecar render -f` (and `sidecar up -f`) on hostile or broken input files: one line naming the file and
what is wrong, exit 2, no traceback, within LoadLimits; a bad edit under `sidecar up -f` keeps the running
config."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sidecar.cli import main
from sidecar.errors import ConfigError
from sidecar.translate.resources import LoadLimits, load_resources
from tests.support.net import free_port
from tests.support.translate_servers import NamedBackend

CONFIG_MAP = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  a: b\n"


def _render(capsys: pytest.CaptureFixture[str], *paths: Path | str) -> str:
    """Run `sidecar render -f ...` in process; it must fail with exit 2 and exactly one line on stderr."""
    args = ["render"]
    for path in paths:
        args += ["-f", str(path)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidecar: error: "), err
    return lines[0]


def _nested_flow(depth: int) -> str:
    return "a: " + "[" * depth + "]" * depth + "\n"


def _nested_block(depth: int) -> str:
    return "".join(" " * i + "k:\n" for i in range(depth))


def _nested_mixed(depth: int) -> str:
    return "".join("  " * i + ("- " if i % 2 else "k:") + "\n" for i in range(depth)).replace("- \n", "- x:\n")


def _laughs(levels: int, fan_out: int) -> str:
    """A few anchors, each a list of `fan_out` aliases of the one before: fan_out**levels nodes."""
    lines = ["l0: &l0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan_out) + "]")
    return "\n".join(lines) + "\n"


TEXT_CASES: dict[str, tuple[bytes, str]] = {
    "latin-1": ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    "utf-16": ("apiVersion: v1\nkind: ConfigMap\n".encode("utf-16"), "not UTF-8 text"),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    # libyaml's scanner stops this one itself ("exceeded maximum nesting depth"), before our composer does.
    "deep-flow-100k": (_nested_flow(100_000).encode(), "line 1: not valid YAML: exceeded maximum nesting depth"),
    "deep-flow-900": (_nested_flow(900).encode(), "nested deeper than 64 levels (LoadLimits.max_depth)"),
    "deep-flow-65": (_nested_flow(65).encode(), "nested deeper than 64 levels"),
    "deep-block": (_nested_block(3000).encode(), "nested deeper than 64 levels"),
    "deep-mixed": (_nested_mixed(500).encode(), "nested deeper than 64 levels"),
    "billion-laughs": (_laughs(9, 9).encode(), "YAML nodes in one document, aliases expanded"),
    "wide-laughs": (_laughs(3, 200).encode(), "YAML nodes in one document, aliases expanded"),
    "merge-key-laughs": (
        (_laughs(4, 20) + "m: &m {a: *l4}\n" + "".join(f"m{i}: {{<<: *m}}\n" for i in range(200))).encode(),
        "aliases expanded",
    ),
    "self-alias": (
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: &m\n  name: a\n  labels: *m\n",
        "alias *m is used inside",
    ),
    "duplicate-key": (b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  name: b\n", "duplicate key 'name'"),
    "duplicate-top-key": (b"kind: ConfigMap\napiVersion: v1\nkind: Secret\n", "duplicate key 'kind'"),
    "duplicate-in-list-item": (
        b"apiVersion: v1\nkind: List\nitems:\n  - {apiVersion: v1, kind: ConfigMap, kind: Secret}\n",
        "duplicate key 'kind'",
    ),
    "many-empty-documents": (b"---\n" * 5001, "more than 5000 YAML documents (LoadLimits.max_file_documents)"),
    "many-documents": (
        "---\n".join(CONFIG_MAP.format(name=f"c{i}") for i in range(5001)).encode(),
        "more than 5000 YAML documents",
    ),
    "bad-date": (b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {d: 2024-13-45}\n", "cannot be read"),
    "huge-int": (b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nx: " + b"9" * 5000 + b"\n", "cannot be read"),
    "broken-flow": (b"apiVersion: v1\nkind: [ConfigMap\n", "not valid YAML"),
    "tab-indent": (b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n\tname: a\n", "not valid YAML"),
    "python-tag": (b"!!python/object/apply:os.system [true]\n", "not valid YAML"),
    "undefined-alias": (b"a: *nowhere\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_bad_file_is_one_line_naming_the_file(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, message = TEXT_CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(data)
    line = _render(capsys, path)
    assert line.startswith(f"sidecar: error: {path}: "), line
    assert message in line, line


def test_too_big_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate(LoadLimits().max_file_bytes + 1)  # sparse: costs no disk
    assert f"{path}: larger than {8 << 20} bytes (LoadLimits.max_file_bytes)" in _render(capsys, path)


def test_special_files_given_as_f(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert f"{fifo}: a FIFO, expected a YAML file or a directory" in _render(capsys, fifo)
    assert "/dev/zero: a device, expected a YAML file" in _render(capsys, "/dev/zero")
    assert "/dev/null: a device" in _render(capsys, "/dev/null")


def _symlink_loop(directory: Path) -> Path:
    (directory / "a.yaml").symlink_to(directory / "b.yaml")
    (directory / "b.yaml").symlink_to(directory / "a.yaml")
    return directory / "a.yaml"


DIRECTORY_CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "symlink-loop": (_symlink_loop, "a.yaml: symlink loop"),
    "self-symlink": (lambda d: (d / "self.yaml").symlink_to(d / "self.yaml"), "self.yaml: symlink loop"),
    "dangling-symlink": (lambda d: (d / "gone.yaml").symlink_to(d / "nowhere"), "gone.yaml: dangling symlink"),
    "fifo": (lambda d: os.mkfifo(d / "pipe.yaml"), "pipe.yaml: a FIFO, expected a YAML file"),
    "link-to-dev-zero": (
        lambda d: (d / "zero.yml").symlink_to("/dev/zero"),
        "zero.yml: a device, expected a YAML file",
    ),
    "thousands-of-files": (
        lambda d: [(d / f"r{i:05}.yaml").write_text(CONFIG_MAP.format(name=f"c{i}")) for i in range(1001)],
        "more than 1000 YAML files (LoadLimits.max_files)",
    ),
}


@pytest.mark.parametrize("case", sorted(DIRECTORY_CASES))
def test_bad_directory_is_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, message = DIRECTORY_CASES[case]
    (tmp_path / "good.yaml").write_text(CONFIG_MAP.format(name="good"))
    make(tmp_path)
    line = _render(capsys, tmp_path)
    assert message in line and str(tmp_path) in line, line


def test_symlink_loop_given_as_f(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loop = _symlink_loop(tmp_path)
    assert f"{loop}: symlink loop" in _render(capsys, loop)


def test_limits_across_files(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"f{i}.yaml").write_text("---\n".join(CONFIG_MAP.format(name=f"c{i}-{j}") for j in range(30)))
    assert len(load_resources([tmp_path]).items) == 120
    cases = [
        (LoadLimits(max_documents=100), "f3.yaml: more than 100 YAML documents in all (LoadLimits.max_documents)"),
        (LoadLimits(max_total_bytes=6000), "input files together are larger than 6000 bytes"),
        (LoadLimits(max_nodes=1000), "more than 1000 YAML nodes in all"),
        (LoadLimits(max_dir_entries=3), "more than 3 directory entries (LoadLimits.max_dir_entries)"),
        (LoadLimits(max_files=3), "more than 3 YAML files"),
    ]
    for limits, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_resources([tmp_path], limits)


def test_list_items_count_as_documents(tmp_path: Path) -> None:
    items = ", ".join(f"{{apiVersion: v1, kind: ConfigMap, metadata: {{name: c{i}}}}}" for i in range(50))
    path = tmp_path / "list.yaml"
    path.write_text(f"apiVersion: v1\nkind: List\nitems: [{items}]\n")
    assert len(load_resources([path]).items) == 50
    with pytest.raises(ConfigError, match="more than 20 resources in all"):
        load_resources([path], LoadLimits(max_documents=20))


def test_honest_yaml_still_loads(tmp_path: Path) -> None:
    """Anchors, merge keys, a BOM, nesting up to the limit and a file just under the size cap are fine."""
    path = tmp_path / "ok.yaml"
    deep = "{a: " * 60 + "1" + "}" * 60
    path.write_text(
        "\ufeffapiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  labels: &labels {app: x, tier: web}\n"
        f"  annotations:\n    <<: *labels\n    deep: '{deep}'\ndata:\n  nested: x\n"
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b, labels: {ref: y}}\n"
        f"data: {{k: {'{a: ' * 55 + '1' + '}' * 55}}}\n",
        encoding="utf-8",
    )
    big = tmp_path / "big.yaml"
    big.write_text(CONFIG_MAP.format(name="big") + "# " + "x" * ((8 << 20) - 200) + "\n")
    loaded = load_resources([path, big])
    assert [r.name for r in loaded] == ["a", "b", "big"]
    assert loaded.items[0].data["metadata"]["annotations"]["app"] == "x"


def test_worst_case_is_refused_without_a_traceback(tmp_path: Path) -> None:
    """The whole command, as a user runs it: a RecursionError used to print 2,994 lines."""
    path = tmp_path / "deep.yaml"
    path.write_text(_nested_flow(100_000))
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "render", "-f", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"sidecar: error: {path}: line 1: ") and "nest" in line, line


# ---- `sidecar up -f`: a bad edit is reported and the running config keeps serving ---------------------


GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eg}}
spec:
  gatewayClassName: eg
  listeners: [{{name: http, protocol: HTTP, port: {port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: app}}
spec:
  parentRefs: [{{name: eg}}]
  rules:
    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{set: [{{name: x-edit, value: "{edit}"}}]}}
      backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: app}}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: app}}
spec:
  endpoints: [{{ip: {{address: 127.0.0.1, port: {backend}}}}}]
"""


@pytest.mark.envoy
def test_up_f_reports_bad_edits_and_keeps_serving(tmp_path: Path) -> None:
    backend = NamedBackend("app")
    port = free_port()
    config = tmp_path / "eg.yaml"
    config.write_text(GATEWAY.format(port=port, backend=backend.port, edit="1"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "up", "-f", str(tmp_path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None

    def read() -> None:
        for line in proc.stderr or []:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def next_line(prefix: str) -> str:
        while True:
            line = lines.get(timeout=60)  # raises queue.Empty instead of hanging
            if line.startswith(prefix):
                return line

    url = f"http://127.0.0.1:{port}/"
    try:
        next_line("listener default/eg/http")
        edits: list[tuple[Callable[[], object], str]] = [
            (lambda: config.write_bytes(b"kind: \xff\n"), "not UTF-8 text"),
            (lambda: config.write_text(_nested_block(3000)), "nested deeper than 64 levels"),
            (lambda: config.write_text(_laughs(9, 9)), "aliases expanded"),
            (
                lambda: config.write_text(GATEWAY.format(port=port, backend=backend.port, edit="1") + "kind: x\n"),
                "duplicate key",
            ),
            (lambda: os.mkfifo(tmp_path / "pipe.yaml"), "pipe.yaml: a FIFO"),
        ]
        for edit, message in edits:
            edit()
            assert message in next_line("reload failed, keeping the running config")
            assert httpx.get(url, timeout=10).headers.get("x-edit") == "1"
        (tmp_path / "pipe.yaml").unlink()
        config.write_text(GATEWAY.format(port=port, backend=backend.port, edit="2"))
        next_line("reloaded")
        assert httpx.get(url, timeout=10).headers.get("x-edit") == "2"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)
            proc.stderr.close()
            backend.close()
