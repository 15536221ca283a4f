"""What the native module calls: `configure` at Envoy's config load, then one `BridgeStream` per HTTP stream.

The filter config JSON (written by `sidecar.inprocess.module.http_filter`):

    {"factory": "sidecar.inprocess.bridge:configure", "config": "/abs/sidecar.yaml", "chain": "default",
     "site": [...], "hook_deadline_ms": 1000}

The sidecar config file and its chain names are the ones `sidecar serve` reads. A chain the in-process filter
cannot run as the ext_proc server would is refused here, in one line that Envoy prints as it rejects the
filter config:

* FULL_DUPLEX_STREAMED bodies. There the ext_proc server answers at its own pace, detached from Envoy's
  chunks; the native module's contract ties every output to an input chunk, so `on_*_stream` hooks would
  need a pause and a loop hand-off per chunk and still could not emit after their input ended. The sidecar
  runs them (docs: the in-process backend).
* Plugins that read Envoy attributes or forwarded metadata (`request_attributes`, `response_attributes`,
  `forwarding_namespaces`): the contract carries neither, and a plugin would see nothing where it relies on
  something (an IP allow list on `source.address`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from sidecar.chains import Chain, load_sidecar
from sidecar.errors import ConfigError
from sidecar.inprocess.loop import shared_loop
from sidecar.inprocess.meters import Meters
from sidecar.inprocess.stream import BridgeStream, StreamPlan
from sidecar.plugins import BodyMode
from sidecar.wire import PHASES

__all__ = [
    "DEFAULT_HOOK_DEADLINE_MS",
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_FILTER_CONFIG",
    "MAX_HOOK_DEADLINE_MS",
    "InProcessConfig",
    "check_chain",
    "configure",
    "meters",
    "serve_metrics",
]

#: How long an async hook may run before its chain's failure policy applies (the contract's default).
DEFAULT_HOOK_DEADLINE_MS = 1000
MAX_HOOK_DEADLINE_MS = 3_600_000
#: The largest body (or chunk) the native module copies either way (its `max_body_bytes`, same default).
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_MAX_BODY_BYTES = 1 << 30
#: The filter config is a few hundred bytes; a bigger one is not ours.
MAX_FILTER_CONFIG = 64 * 1024
# `site`, `max_body_bytes` and `max_python_bytes` are the native module's (it checks them); the bridge reads the rest.
_FIELDS = frozenset({"factory", "config", "chain", "site", "hook_deadline_ms", "max_body_bytes", "max_python_bytes"})

#: Body modes as the native module knows them: 0 none, 1 buffered (C holds the headers), 2 streamed, 3 buffered
#: partial (C holds the headers and buffers up to Envoy's buffer limit, then calls the hook once, as ext_proc).
_NATIVE_BODY_MODE = {
    BodyMode.NONE: 0,
    BodyMode.BUFFERED: 1,
    BodyMode.STREAMED: 2,
    BodyMode.BUFFERED_PARTIAL: 3,
}
log = logging.getLogger("sidecar.inprocess")

_PHASE_BITS = {phase: 1 << i for i, phase in enumerate(PHASES)}

#: Every in-process filter of this Envoy counts into one Meters (one process, one GIL).
_meters = Meters()


def meters() -> Meters:
    """The numbers of every in-process filter in this process (for whatever serves metrics)."""
    return _meters


class InProcessConfig:
    """One in-process filter config: a chain, and what the native module needs to drive it."""

    def __init__(
        self, chain: Chain, native: Any, hook_deadline_ms: int, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ) -> None:
        schedule = getattr(native, "schedule", None)
        if not callable(schedule):
            raise ConfigError("in-process filter: the native module has no schedule(handle) function")
        self.chain = chain
        mode = chain.mode
        #: The phases C calls Python for (bit i: PHASES[i]); request headers always, as ext_proc sends them.
        self.phases = _PHASE_BITS["request_headers"]
        sent = {
            "request_body": mode.request_body_mode != BodyMode.NONE,
            "request_trailers": mode.request_trailer_mode == mode.SEND,
            "response_headers": mode.response_header_mode == mode.SEND,
            "response_body": mode.response_body_mode != BodyMode.NONE,
            "response_trailers": mode.response_trailer_mode == mode.SEND,
        }
        for phase, on in sent.items():
            if on:
                self.phases |= _PHASE_BITS[phase]
        body_modes = (int(mode.request_body_mode), int(mode.response_body_mode))
        self.request_body_mode = _NATIVE_BODY_MODE[BodyMode(body_modes[0])]
        self.response_body_mode = _NATIVE_BODY_MODE[BodyMode(body_modes[1])]
        async_hooks = _async_hooks(chain)
        runner = shared_loop() if async_hooks else None
        #: 1: nothing settles this chain's streams from another thread (no async hook), so the native module may
        #: close one at its last hook, under the GIL it holds, rather than take the GIL again when Envoy destroys
        #: the filter (it does so for chains of headers phases only).
        self.releases_early = 0 if async_hooks else 1
        deadline = hook_deadline_ms / 1000
        self.plan = StreamPlan.of(chain, _meters, schedule, runner, deadline, async_hooks, max_body_bytes)
        #: `new_stream(handle)`: the stream C drives (a partial, not a method: one Python frame less a request).
        self.new_stream: Callable[[int], BridgeStream] = partial(BridgeStream, self.plan)


def _async_hooks(chain: Chain) -> dict[str, int]:
    counts = {phase: sum(hook.is_async for hook in chain.hooks[phase]) for phase in PHASES}
    for direction in ("request", "response"):
        counts[f"{direction}_body"] += sum(stage.hook.is_async for stage in chain.body_stages[direction])
    return {phase: count for phase, count in counts.items() if count}


def configure(filter_config_json: str, native: Any) -> InProcessConfig:
    """The factory the native module calls on Envoy's main thread at config load. A ConfigError (or a
    PluginLoadError from a plugin) names the field or file and what was expected, in one line."""
    fields = _parse(filter_config_json)
    path = fields["config"]
    config_path = Path(path)
    if not config_path.is_absolute():
        raise ConfigError(f"in-process filter config: field 'config': expected an absolute path, got {path!r}")
    config, registry = load_sidecar(config_path)
    name = fields["chain"]
    chain = registry.chains.get(name)
    if chain is None:
        known = ", ".join(sorted(registry.chains))
        raise ConfigError(f"in-process filter config: chain {name!r} is not in {path} (its chains: {known})")
    check_chain(chain, path)
    if config.metrics:
        serve_metrics(config.metrics)
    return InProcessConfig(chain, native, fields["hook_deadline_ms"], fields["max_body_bytes"])


_endpoint: Any = None  # the process's Endpoint, once one is serving
_endpoint_lock = threading.Lock()


def serve_metrics(address: str) -> int:
    """Serve the meters on `address` (the config file's `metrics`), once per process: the first filter config
    that names an address binds it; a later one naming another address is told so in the log, and the first
    keeps serving (one Envoy, one interpreter, one set of numbers). The bound port (0 while the address is in use,
    see `Endpoint.start`)."""
    global _endpoint
    with _endpoint_lock:
        if _endpoint is None:
            from sidecar.inprocess.endpoint import Endpoint  # prometheus_client only where metrics are served

            endpoint = Endpoint(address, _meters, shared_loop())
            endpoint.start()
            _endpoint = endpoint
        elif _endpoint.address != address:
            log.warning(
                "in-process metrics already served on %s for this Envoy; %s (another filter config) is not",
                _endpoint.address,
                address,
            )
        return int(_endpoint.port)


def _parse(text: Any) -> dict[str, Any]:
    where = "in-process filter config"
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected a JSON text, got {type(text).__name__}")
    if len(text) > MAX_FILTER_CONFIG:
        raise ConfigError(f"{where}: {len(text)} characters; expected at most {MAX_FILTER_CONFIG}")
    try:
        fields = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; expected {', '.join(sorted(_FIELDS))}")
    for key in ("config", "chain"):
        value = fields.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: field {key!r}: expected a non-empty string, got {_shown(value)}")
    for key, default, top, unit in (
        ("hook_deadline_ms", DEFAULT_HOOK_DEADLINE_MS, MAX_HOOK_DEADLINE_MS, "milliseconds"),
        ("max_body_bytes", DEFAULT_MAX_BODY_BYTES, MAX_MAX_BODY_BYTES, "bytes"),
    ):
        value = fields.setdefault(key, default)
        if type(value) is not int or not 1 <= value <= top:  # the native module reads them as exact ints too
            raise ConfigError(f"{where}: field {key!r}: expected whole {unit} from 1 to {top}, got {_shown(value)}")
    return fields


def _shown(value: Any) -> str:
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:80])
    return type(value).__name__


def check_chain(chain: Chain, path: str) -> None:
    """A chain the in-process filter cannot run as the ext_proc server would: one ConfigError naming it."""
    where = f"{path}: chain {chain.name!r}"
    if chain.full_duplex:
        raise ConfigError(
            f"{where}: FULL_DUPLEX_STREAMED bodies cannot run in-process (outputs are not tied to Envoy's "
            "chunks there); serve this chain from the sidecar"
        )
    for declaration in ("request_attributes", "response_attributes", "forwarding_namespaces"):
        declared = getattr(chain, declaration)
        if declared:
            raise ConfigError(
                f"{where}: its plugins declare {declaration} ({', '.join(declared)}), which the in-process "
                "filter cannot give them; serve this chain from the sidecar"
            )
