from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.config import Limits, load_config, parse_byte_size, parse_config
from sidecar.errors import ConfigError


def test_yaml_with_chains_and_shorthand(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "listen: unix:/tmp/x/s.sock\nworkers: 2\nsocket_mode: '0640'\n"
        "plugins: [header-stamp]\n"
        "chains:\n  admin:\n    on_error: fail_open\n"
        "    plugins:\n      - use: json-redact\n        config: {fields: [a]}\n"
    )
    config = load_config(path)
    assert [c.name for c in config.chains] == ["default", "admin"]
    assert config.chains[1].on_error == "fail_open"
    assert config.chains[1].plugins[0].config == {"fields": ["a"]}
    assert config.socket_mode == 0o640
    assert [p.name for p in config.socket_paths()] == ["s-0.sock", "s-1.sock"]


def test_toml(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text('grace_period = 3\n[[chains.default.plugins]]\nuse = "header-stamp"\n')
    config = load_config(path)
    assert config.grace_period == 3
    assert config.chains[0].plugins[0].use == "header-stamp"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"workers": 0}, "workers: expected a number from 1 to 256, got 0"),
        ({"workers": 1.5}, "workers: expected a whole number"),
        ({"socket_mode": "0666"}, "world-writable"),
        ({"socket_mode": "rw"}, "expected an octal file mode"),
        ({"listen": "tcp:1.2.3.4:5"}, "listen: expected unix:PATH"),
        ({"chains": {"a": {"plugins": []}}}, "chains.a.plugins: expected a non-empty list"),
        ({"chains": {"a": {"plugins": ["x"], "on_error": "explode"}}}, "chains.a.on_error: expected fail_closed or"),
        ({"plugins": [{"config": {}}]}, "plugins[0].use: required"),
        ({"plugins": [{"use": "x", "colour": 1}]}, "plugins[0].colour: unknown field"),
        ({"bogus": 1}, "bogus: unknown field"),
        ({"transport": "quic"}, "transport: expected native or grpcio, got 'quic'"),
        ({"stall_timeout": 0.5}, "stall_timeout: expected 0 (never) or at least 1 second, got 0.5"),
        ({"stall_timeout": -1}, "stall_timeout: expected a number from 0 to 3600, got -1"),
        ({"stall_timeout": "30s"}, "stall_timeout: expected a number from 0 to 3600, got '30s'"),
        ({"tune_malloc": "no"}, "tune_malloc: expected true or false, got 'no'"),
    ],
)
def test_errors_name_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: ") as info:
        parse_config(data, "f.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_tune_malloc_defaults_on() -> None:
    assert parse_config({}, "f.yaml").tune_malloc is True
    assert parse_config({"tune_malloc": False}, "f.yaml").tune_malloc is False


def test_long_values_are_not_echoed_whole() -> None:
    secret = "s3cr3t-" * 50
    with pytest.raises(ConfigError) as info:
        parse_config({"metrics": {"token": secret}}, "f.yaml")
    assert len(str(info.value)) < 150 and secret not in str(info.value)
    assert "f.yaml: metrics: expected a non-empty string, got dict" in str(info.value)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)


def test_limits_default_and_parse() -> None:
    assert parse_config({}, "f.yaml").limits == Limits()
    assert Limits().receive_buffer <= 256 * 1024 * 1024
    config = parse_config(
        {
            "limits": {
                "receive_buffer": "512MiB",
                "connection_receive_buffer": 64 * 1024 * 1024,
                "max_connections": 16,
                "handshake_timeout": 2.5,
                "idle_timeout": 0,
                "control_frame_rate": 0,
            }
        },
        "f.yaml",
    )
    limits = config.limits
    assert (limits.receive_buffer, limits.connection_receive_buffer) == (512 << 20, 64 << 20)
    assert (limits.max_connections, limits.handshake_timeout, limits.idle_timeout) == (16, 2.5, 0)
    assert limits.max_empty_frames == Limits().max_empty_frames  # the rest keep their defaults


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1024, 1024), ("1GiB", 1 << 30), ("64 KiB", 64 << 10), ("2mb", 2_000_000), ("8MIB", 8 << 20)],
)
def test_byte_sizes(size: object, expected: int) -> None:
    assert parse_byte_size(size) == expected


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"receive_buffer": "lots"}, "limits.receive_buffer: expected a size in bytes from 1MiB to 64GiB"),
        ({"receive_buffer": 1000}, "limits.receive_buffer: expected a size in bytes"),
        ({"receive_buffer": "1.5GiB"}, "limits.receive_buffer: expected a size in bytes"),
        ({"receive_buffer": True}, "limits.receive_buffer: expected a size in bytes"),
        ({"connection_receive_buffer": "300MiB"}, "limits.connection_receive_buffer: expected at most"),
        ({"max_connections": 0}, "limits.max_connections: expected a number from 1 to"),
        ({"max_connections": 2.5}, "limits.max_connections: expected a whole number"),
        ({"handshake_timeout": 0}, "limits.handshake_timeout: expected a number from 0.01 to 3600"),
        ({"idle_timeout": -1}, "limits.idle_timeout: expected a number from 0"),
        ({"idle_timeout": "1h"}, "limits.idle_timeout: expected a number"),
        ({"premature_reset_streams": 1}, "limits.premature_reset_streams: expected a number from 2"),
        ({"max_streams": 5}, "limits.max_streams: unknown field (expected one of"),
    ],
)
def test_limit_errors_name_the_field(limits: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: ") as info:
        parse_config({"limits": limits}, "f.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"f\.yaml: limits: expected a mapping"):
        parse_config({"limits": [1]}, "f.yaml")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"chains: {default: [x]}\n\xff\xfe", "not UTF-8"),
        (b"a: " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid YAML"),
        (b"x" * ((1 << 20) + 1), "over 1 MiB"),
    ],
    ids=["non-utf8", "deep", "huge"],
)
def test_a_bad_config_file_is_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir"])
def test_a_config_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path: Path, special: str) -> None:
    path = Path(special)
    if special == "fifo":
        path = tmp_path / "sidecar.yaml"
        os.mkfifo(path)
    elif special == "dir":
        path = tmp_path
    with pytest.raises(ConfigError, match=r"regular file|cannot read"):
        load_config(path)
