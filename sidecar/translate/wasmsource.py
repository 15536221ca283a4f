"""The seam between the translator and the Wasm fetcher: `fetch_module(code) -> Envoy AsyncDataSource dict`.

`code` is an EnvoyExtensionPolicy wasm `code` block. HTTP sources are handled here, minimally: download
with a timeout and a size cap, check the user's sha256 against the body (EG's semantics), check the
`\\0asm` magic, store content-addressed in the cache directory and return `{"local": {"filename": ...}}`.
OCI images need the fetcher being written on its own branch; this module is meant to be replaced by
its `source.py`, keeping the function signature.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sidecar.errors import ConfigError

__all__ = ["MAX_MODULE_BYTES", "default_cache_dir", "fetch_module"]

MAX_MODULE_BYTES = 256 * 1024 * 1024  # EG's limit
_TIMEOUT_SECONDS = 15.0
_WASM_MAGIC = b"\0asm"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "envoy-sidecar" / "wasm"


def _download(url: str, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_SECONDS) as resp:
            body = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"downloading {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"downloading {url}: {reason}") from None
    if len(body) > limit:
        raise ConfigError(f"downloading {url}: module larger than {limit} bytes")
    return bytes(body)


def fetch_module(code: dict[str, Any], cache_dir: Path | None = None) -> dict[str, Any]:
    """Fetch and verify a module; the Envoy `code` AsyncDataSource as a dict."""
    if code["type"] == "Image":
        raise ConfigError("OCI images need the wasm fetcher (not available in this build); use code.type HTTP")
    spec = code["http"]
    url = spec["url"]
    directory = cache_dir or default_cache_dir()
    expected = spec.get("sha256")
    if expected is not None and (directory / f"{expected}.wasm").is_file():
        # Content-addressed: a file named by the sha256 asked for was verified when it was written.
        return {"local": {"filename": str(directory / f"{expected}.wasm")}}
    body = _download(url, MAX_MODULE_BYTES)
    digest = hashlib.sha256(body).hexdigest()
    if expected is not None and digest != expected:
        raise ConfigError(f"sha256 mismatch for {url}: expected {expected}, got {digest}")
    if not body.startswith(_WASM_MAGIC):
        raise ConfigError(f"{url} is not a Wasm module (no \\0asm magic)")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{digest}.wasm"
    if not target.exists():
        # Write then rename, so a concurrent reader never sees half a module.
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
        with os.fdopen(fd, "wb") as out:
            out.write(body)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    return {"local": {"filename": str(target)}}
