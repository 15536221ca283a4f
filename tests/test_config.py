from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import load_config, parse_config
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
    ],
)
def test_errors_name_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: ") as info:
        parse_config(data, "f.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


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
