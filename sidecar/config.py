"""The sidecar config file (YAML or TOML) and its validation.

    listen: unix:/run/envoy-sidecar/extproc.sock   # or a list; tcp: host:port with tls below
    socket_mode: "0660"
    workers: 1
    metrics: 127.0.0.1:9464                        # Prometheus endpoint; omit to disable
    grace_period: 10                               # seconds in-flight streams get on SIGTERM
    message_timeout: 0.5                           # for the generated Envoy config
    stream_timeout: 10                             # deadline for streaming body hooks (FULL_DUPLEX)
    stall_timeout: 30                              # the event loop stuck this long: stacks dumped, worker exits
    transport: native                              # or grpcio (grpc.aio): see docs/serving.md
    tracing: false                                 # OpenTelemetry spans, exporter from OTEL_* (docs/serving.md)
    access_log: false                              # one log line per ext_proc stream
    tune_malloc: true                              # glibc: body buffers reused (docs/serving.md)
    limits:                                        # what a peer may cost a worker (docs/serving.md)
      receive_buffer: 256MiB                       # received, unread messages, all connections together
      connection_receive_buffer: 128MiB
      max_connections: 1024
      handshake_timeout: 10                        # seconds for the client preface and first SETTINGS
      idle_timeout: 7200                           # seconds without streams or frames; 0 = never
      max_empty_frames: 10                         # consecutive empty DATA/HEADERS/CONTINUATION frames
      control_frame_burst: 1000                    # PING/SETTINGS/WINDOW_UPDATE/PRIORITY/RST_STREAM ...
      control_frame_rate: 100                      # ... and how many more a second
      premature_reset_streams: 500
      max_unread_replies: 1000
    chains:
      default:
        on_error: fail_closed                      # or fail_open
        plugins:
          - use: header-stamp                      # entry point name, or module:attr
            config: {header: x-request-id}

A top-level `plugins:` list is shorthand for the chain named `default`. Every error names the file and
the field path.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import ConfigError

__all__ = [
    "ChainSpec",
    "Limits",
    "PluginSpec",
    "SidecarConfig",
    "TlsConfig",
    "load_config",
    "parse_byte_size",
    "parse_host_port",
    "parse_socket_mode",
]

DEFAULT_SOCKET = "/tmp/envoy-sidecar/extproc.sock"
TRANSPORTS = ("native", "grpcio")
DEFAULT_CHAIN = "default"
#: How long FULL_DUPLEX body stages may stall (Envoy applies no timeout there); the server's and the Driver's.
DEFAULT_STREAM_TIMEOUT = 10.0
#: How long a worker's event loop may stop turning (a hook that never gives it back: a synchronous loop, code blocked
#: in C holding the GIL) before the worker dumps every thread's stack and exits, to be restarted. 0: never.
DEFAULT_STALL_TIMEOUT = 30.0
FAILURE_POLICIES = ("fail_closed", "fail_open")


@dataclass(frozen=True)
class PluginSpec:
    use: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChainSpec:
    name: str
    plugins: tuple[PluginSpec, ...]
    on_error: str = "fail_closed"


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None


MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one peer may cost a serving process (a worker), and what all of them together may.

    The native transport enforces every field; `transport: grpcio` only those docs/serving.md names."""

    #: Bytes of received messages not yet read by their handlers, over every connection of the process;
    #: past it the call holding the most (whatever its connection) ends with RESOURCE_EXHAUSTED.
    receive_buffer: int = 256 * MIB
    #: The same, for one connection.
    connection_receive_buffer: int = 128 * MIB
    #: Connections open at once; one more gets GOAWAY ENHANCE_YOUR_CALM and is closed.
    max_connections: int = 1024
    #: Seconds a new connection has to send the client preface and its first SETTINGS frame.
    handshake_timeout: float = 10.0
    #: Seconds without open streams or frames before a graceful GOAWAY; 0 never. Above Envoy's own default
    #: (1 h for upstream connections, and no PINGs), so Envoy always closes an idle connection first.
    idle_timeout: float = 7200.0
    #: Consecutive DATA, HEADERS or CONTINUATION frames without payload (and not ending the stream).
    max_empty_frames: int = 10
    #: Control frames (PING, SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM, unknown types) a peer may send
    #: at once; they are earned back at `control_frame_rate` a second and by frames that carry data.
    control_frame_burst: int = 1000
    control_frame_rate: float = 100.0
    #: Rapid reset (CVE-2023-44487): once the peer reset or had refused half of this many streams before
    #: their handlers started, and half of all the streams it opened, the connection ends.
    premature_reset_streams: int = 500
    #: Replies (PING and SETTINGS acknowledgements, RST_STREAM) queued for a peer that does not read them.
    max_unread_replies: int = 1000


@dataclass(frozen=True)
class SidecarConfig:
    chains: tuple[ChainSpec, ...] = ()
    listen: str = f"unix:{DEFAULT_SOCKET}"
    tcp: str | None = None
    tls: TlsConfig | None = None
    socket_mode: int = 0o660
    workers: int = 1
    metrics: str | None = None
    grace_period: float = 10.0
    message_timeout: float = 0.5
    stream_timeout: float = DEFAULT_STREAM_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    log_format: str = "json"
    #: "native": the sidecar's own HTTP/2 gRPC transport on the event loop (fast); "grpcio": grpc.aio.
    transport: str = "native"
    #: OpenTelemetry spans per stream, phase and plugin (the `otel` extra; OTEL_* configure the exporter).
    tracing: bool = False
    #: One `sidecar.access` log line per ext_proc stream.
    access_log: bool = False
    #: Fix glibc's malloc thresholds so freed body buffers are reused (extproc/allocator.py).
    tune_malloc: bool = True
    limits: Limits = field(default_factory=Limits)
    source: str = "<defaults>"

    @property
    def socket_path(self) -> Path:
        return Path(self.listen.removeprefix("unix:"))

    def socket_paths(self) -> list[Path]:
        """One socket per worker: the configured path itself, or NAME-0.sock, NAME-1.sock, ..."""
        path = self.socket_path
        if self.workers == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(self.workers)]


class _Reader:
    """Typed field access that turns every problem into a ConfigError naming file and field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, expected: str, got: Any) -> ConfigError:
        # Show enough of the value to recognise it, not a whole document (or a secret pasted in the wrong place).
        shown = repr(got)
        if len(shown) > 60:
            shown = f"{type(got).__name__} {shown[:40]}..."
        return ConfigError(f"{self.source}: {path}: expected {expected}, got {shown}")

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise self.fail(path, "a mapping", value)
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, "a non-empty string", value)
        return value

    def number(self, value: Any, path: str, minimum: float, maximum: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= maximum:
            raise self.fail(path, f"a number from {minimum:g} to {maximum:g}", value)
        return float(value)

    def only(self, data: dict[str, Any], path: str, allowed: set[str]) -> None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            where = f"{path}.{unknown[0]}" if path else unknown[0]
            raise ConfigError(f"{self.source}: {where}: unknown field (expected one of {', '.join(sorted(allowed))})")


_TOP_FIELDS = {
    "chains",
    "plugins",
    "listen",
    "tcp",
    "tls",
    "socket_mode",
    "workers",
    "metrics",
    "grace_period",
    "message_timeout",
    "stream_timeout",
    "stall_timeout",
    "log_format",
    "transport",
    "limits",
    "tracing",
    "access_log",
    "tune_malloc",
}

#: limits field -> (kind, minimum, maximum); sizes are bytes (or "64MiB"), times are seconds.
_LIMIT_FIELDS: dict[str, tuple[str, float, float]] = {
    "receive_buffer": ("size", MIB, 64 * 1024 * MIB),
    "connection_receive_buffer": ("size", MIB, 64 * 1024 * MIB),
    "max_connections": ("count", 1, 1_000_000),
    "handshake_timeout": ("number", 0.01, 3600),
    "idle_timeout": ("number", 0, 7 * 86400),
    "max_empty_frames": ("count", 1, 1_000_000),
    "control_frame_burst": ("count", 1, 1_000_000),
    "control_frame_rate": ("number", 0, 1_000_000),
    "premature_reset_streams": ("count", 2, 1_000_000),
    "max_unread_replies": ("count", 1, 1_000_000),
}


def _plugin(r: _Reader, raw: Any, path: str) -> PluginSpec:
    if isinstance(raw, str):
        return PluginSpec(use=r.string(raw, path))
    data = r.mapping(raw, path)
    r.only(data, path, {"use", "config"})
    if "use" not in data:
        raise ConfigError(f"{r.source}: {path}.use: required (an entry point name or module:attr)")
    config = r.mapping(data.get("config") or {}, f"{path}.config")
    return PluginSpec(use=r.string(data["use"], f"{path}.use"), config=config)


def _chain(r: _Reader, name: str, raw: Any, path: str) -> ChainSpec:
    if isinstance(raw, list):
        raw = {"plugins": raw}
    data = r.mapping(raw, path)
    r.only(data, path, {"plugins", "on_error"})
    plugins = data.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise r.fail(f"{path}.plugins", "a non-empty list of plugins", plugins)
    on_error = data.get("on_error", "fail_closed")
    if on_error not in FAILURE_POLICIES:
        raise r.fail(f"{path}.on_error", " or ".join(FAILURE_POLICIES), on_error)
    specs = tuple(_plugin(r, p, f"{path}.plugins[{i}]") for i, p in enumerate(plugins))
    return ChainSpec(name=name, plugins=specs, on_error=on_error)


def _limits(r: _Reader, raw: Any) -> Limits:
    data = r.mapping(raw if raw is not None else {}, "limits")
    r.only(data, "limits", set(_LIMIT_FIELDS))
    values: dict[str, Any] = {}
    for name, value in data.items():
        kind, minimum, maximum = _LIMIT_FIELDS[name]
        path = f"limits.{name}"
        if kind == "size":
            size = parse_byte_size(value)
            if size is None or not minimum <= size <= maximum:
                raise r.fail(path, "a size in bytes from 1MiB to 64GiB (a number, or e.g. '256MiB')", value)
            values[name] = size
        elif kind == "count":
            number = r.number(value, path, minimum, maximum)
            if number != int(number):
                raise r.fail(path, "a whole number", value)
            values[name] = int(number)
        else:
            values[name] = r.number(value, path, minimum, maximum)
    limits = Limits(**values)
    if limits.connection_receive_buffer > limits.receive_buffer:
        raise ConfigError(
            f"{r.source}: limits.connection_receive_buffer: expected at most limits.receive_buffer "
            f"({limits.receive_buffer} bytes), got {limits.connection_receive_buffer}"
        )
    return limits


def parse_config(data: Any, source: str) -> SidecarConfig:
    r = _Reader(source)
    data = r.mapping(data if data is not None else {}, "(top level)")
    r.only(data, "", _TOP_FIELDS)
    chains: list[ChainSpec] = []
    if "plugins" in data:
        if "chains" in data and DEFAULT_CHAIN in (data["chains"] or {}):
            raise ConfigError(f"{source}: plugins: both `plugins` and `chains.{DEFAULT_CHAIN}` are set")
        chains.append(_chain(r, DEFAULT_CHAIN, {"plugins": data["plugins"]}, "plugins"))
    for name, raw in r.mapping(data.get("chains") or {}, "chains").items():
        chains.append(_chain(r, name, raw, f"chains.{name}"))
    kwargs: dict[str, Any] = {"chains": tuple(chains), "source": source}
    if "listen" in data:
        listen = r.string(data["listen"], "listen")
        if not listen.startswith("unix:"):
            raise r.fail("listen", "unix:PATH (use `tcp:` for TCP)", listen)
        kwargs["listen"] = listen
    if "tcp" in data:
        kwargs["tcp"] = r.string(data["tcp"], "tcp")
        parse_host_port(kwargs["tcp"], f"{source}: tcp")
    if "tls" in data:
        tls = r.mapping(data["tls"], "tls")
        r.only(tls, "tls", {"cert", "key", "client_ca"})
        ca = tls.get("client_ca")
        kwargs["tls"] = TlsConfig(
            cert=Path(r.string(tls.get("cert"), "tls.cert")),
            key=Path(r.string(tls.get("key"), "tls.key")),
            client_ca=Path(r.string(ca, "tls.client_ca")) if ca is not None else None,
        )
    if "socket_mode" in data:
        kwargs["socket_mode"] = parse_socket_mode(data["socket_mode"], f"{source}: socket_mode")
    if "workers" in data:
        kwargs["workers"] = int(r.number(data["workers"], "workers", 1, 256))
        if kwargs["workers"] != data["workers"]:
            raise r.fail("workers", "a whole number", data["workers"])
    if "metrics" in data:
        kwargs["metrics"] = r.string(data["metrics"], "metrics")
        parse_host_port(kwargs["metrics"], f"{source}: metrics")
    if "grace_period" in data:
        kwargs["grace_period"] = r.number(data["grace_period"], "grace_period", 0, 3600)
    if "message_timeout" in data:
        kwargs["message_timeout"] = r.number(data["message_timeout"], "message_timeout", 0.001, 3600)
    if "stream_timeout" in data:
        kwargs["stream_timeout"] = r.number(data["stream_timeout"], "stream_timeout", 0.001, 3600)
    if "stall_timeout" in data:
        kwargs["stall_timeout"] = r.number(data["stall_timeout"], "stall_timeout", 0, 3600)
        if 0 < kwargs["stall_timeout"] < 1:
            raise r.fail("stall_timeout", "0 (never) or at least 1 second", data["stall_timeout"])
    if "transport" in data:
        if data["transport"] not in TRANSPORTS:
            raise r.fail("transport", " or ".join(TRANSPORTS), data["transport"])
        kwargs["transport"] = data["transport"]
    if "log_format" in data:
        if data["log_format"] not in ("json", "text"):
            raise r.fail("log_format", "json or text", data["log_format"])
        kwargs["log_format"] = data["log_format"]
    if "limits" in data:
        kwargs["limits"] = _limits(r, data["limits"])
    for switch in ("tracing", "access_log", "tune_malloc"):
        if switch in data:
            if not isinstance(data[switch], bool):
                raise r.fail(switch, "true or false", data[switch])
            kwargs[switch] = data[switch]
    return SidecarConfig(**kwargs)


_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": MIB, "gib": 1024 * MIB, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_byte_size(value: Any) -> int | None:
    """268435456, '256MiB', '256 MiB', '1GiB', '64kb' -> bytes; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    number = text.rstrip("kmgib ")
    unit = text[len(number) :].strip()
    if not number.isdigit() or unit not in _UNITS:
        return None
    return int(number) * _UNITS[unit]


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:80' or 'name:443' -> (host, port); anything else is a ConfigError."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def parse_socket_mode(value: Any, where: str) -> int:
    """'0660', '660', 0o660 or 432 -> 0o660. World-writable modes are refused."""
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected an octal file mode such as '0660', got {value!r}") from None
    if isinstance(value, bool) or not 0 <= mode <= 0o777:
        raise ConfigError(f"{where}: expected an octal file mode such as '0660', got {value!r}")
    if mode & 0o002:
        raise ConfigError(f"{where}: {value!r} would make the socket world-writable; use 0660 or stricter")
    return mode


#: A sidecar config is a few KiB; anything near this is not one.
MAX_CONFIG_BYTES = 1 << 20


def _read_config(path: Path) -> str:
    """The file's text, read only if it is a regular file within MAX_CONFIG_BYTES (a FIFO or /dev/zero
    given by mistake must not hang or fill memory), decoded as UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: expected a regular file as the config file")
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: the config file is over {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8 text (byte {exc.start})") from None


def load_config(path: str | os.PathLike[str]) -> SidecarConfig:
    path = Path(path)
    text = _read_config(path)
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {first}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a sidecar config") from None
    try:
        return parse_config(data, str(path))
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a sidecar config") from None
