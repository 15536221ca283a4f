"""Differential runs: the same generated plugin actions through the test Driver and through real Envoy.

A case is a script of plugin actions (header edits, body rewrites, replies, failures, metadata) for one
chain, plus a request shape. The script travels in the request's `x-diff` header, so one Envoy and one
sidecar serve every case: the `Diff*` plugins below read it and act it out, in the Driver and in the real
sidecar alike. `observe_driver` and `observe_envoy` reduce each run to what a user can see (status, headers
and body at the client, headers and body at the upstream, rejected mutations, metadata); `compare` applies
the normalisation rules of docs/testing.md ("Differential runs") and lists the differences.

The generator is seeded: `generate(seed, count)` is the same list on every machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sidecar import BodyMode, Context, Headers, Plugin, Respond, StateKey

#: The spec prefix of this module's plugins in a sidecar config.
DP = "tests.support.differential:"

UPLOAD = (b"hello ", b"differential ", b"world")
DOWNLOAD = (b"upstream says ", b"0123456789 ", b"bye")
UPSTREAM_HEADERS = (("content-type", "text/plain"), ("x-up", "u1"), ("set-cookie", "up=1"))
CLIENT_HEADERS = (("content-type", "text/plain"), ("x-client", "c1"), ("x-multi", "m1"))

# ---- the plugins: act out the script in `x-diff` -------------------------------------------------------

_SCRIPT = StateKey[dict[str, Any]]("differential-script")
_SEEN = StateKey[set[str]]("differential-seen")


def _script(ctx: Context) -> dict[str, Any]:
    script = ctx.state.get(_SCRIPT)
    if script is None:
        raw = ctx.request_headers.get("x-diff", "") if ctx.request_headers is not None else ""
        script = json.loads(base64.urlsafe_b64decode(raw)) if raw else {}
        ctx.state[_SCRIPT] = script
    return script


def _reply(op: list[Any]) -> Respond:
    return Respond(op[1], op[3].encode(), [(name, value) for name, value in op[2]])


def _header_ops(ctx: Context, headers: Headers, ops: list[list[Any]]) -> Respond | None:
    for op in ops:
        kind = op[0]
        if kind == "set":
            headers[op[1]] = op[2]
        elif kind == "append":
            headers.append(op[1], op[2])
        elif kind == "remove":
            headers.remove(op[1])
        elif kind == "meta":
            ctx.set_metadata(op[1], op[2], *op[3:])
        elif kind == "respond":
            return _reply(op)
        elif kind == "raise":
            raise RuntimeError("scripted failure in a headers hook")
    return None


def _first(ctx: Context, direction: str) -> bool:
    seen = ctx.state.get(_SEEN)
    if seen is None:
        seen = ctx.state[_SEEN] = set()
    first = direction not in seen
    seen.add(direction)
    return first


def _body_op(ctx: Context, direction: str, body: bytes, end: bool) -> bytes | Respond | None:
    op = _script(ctx).get(f"{direction}_body")
    first = _first(ctx, direction)
    if not op:
        return None
    kind = op[0]
    if kind == "upper":
        return body.upper()
    if kind == "suffix":
        return body + op[1].encode() if end else None
    if kind == "clear":
        return b""
    at = op[-1]
    if (at == "first" and first) or (at == "end" and end):
        if kind == "raise":
            raise RuntimeError("scripted failure in a body hook")
        return _reply(op)
    return None


class DiffHeaders(Plugin):
    """Header hooks only: bodies pass untouched."""

    name = "diff"
    metadata_namespaces = ("other-ns",)

    def on_request_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        return _header_ops(ctx, headers, _script(ctx).get("request_headers", []))

    def on_response_headers(self, ctx: Context, headers: Headers) -> Respond | None:
        return _header_ops(ctx, headers, _script(ctx).get("response_headers", []))


class DiffBuffered(DiffHeaders):
    def on_request_body(self, ctx: Context, body: bytes) -> bytes | Respond | None:
        return _body_op(ctx, "request", body, True)

    def on_response_body(self, ctx: Context, body: bytes) -> bytes | Respond | None:
        return _body_op(ctx, "response", body, True)


class DiffStreamed(DiffHeaders):
    request_body = BodyMode.STREAMED
    response_body = BodyMode.STREAMED

    def on_request_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes | Respond | None:
        return _body_op(ctx, "request", chunk, end)

    def on_response_chunk(self, ctx: Context, chunk: bytes, end: bool) -> bytes | Respond | None:
        return _body_op(ctx, "response", chunk, end)


class DiffPartial(DiffStreamed):
    request_body = BodyMode.BUFFERED_PARTIAL
    response_body = BodyMode.BUFFERED_PARTIAL


async def _stream_op(ctx: Context, direction: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    op = _script(ctx).get(f"{direction}_body") or ["pass"]
    async for chunk in chunks:
        if op[0] == "raise" and op[-1] == "first":
            raise RuntimeError("scripted failure in a stream hook")
        yield chunk.upper() if op[0] == "upper" else b"" if op[0] == "clear" else chunk
    if op[0] == "suffix":
        yield op[1].encode()
    if op[0] == "raise":
        raise RuntimeError("scripted failure at the end of a stream")
    if op[0] == "meta":  # after the input ended: goes with the end of the output
        ctx.set_metadata(op[1], op[2], "other-ns")


class DiffDuplex(DiffHeaders):
    async def on_request_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for out in _stream_op(ctx, "request", chunks):
            yield out

    async def on_response_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for out in _stream_op(ctx, "response", chunks):
            yield out


#: chain name -> (plugin class, on_error). "d" (FULL_DUPLEX) needs its own Envoy: it makes the filter FULL_DUPLEX.
CHAINS = {
    "h": ("DiffHeaders", "fail_closed"),
    "ho": ("DiffHeaders", "fail_open"),
    "b": ("DiffBuffered", "fail_closed"),
    "bo": ("DiffBuffered", "fail_open"),
    "s": ("DiffStreamed", "fail_closed"),
    "p": ("DiffPartial", "fail_closed"),
}
DUPLEX_CHAINS = {"d": ("DiffDuplex", "fail_closed")}
SHAPES = ("get", "post", "chunked", "h2")
#: Chains whose response body goes on as it comes (STREAMED, FULL_DUPLEX_STREAMED).
STREAMING_CHAINS = frozenset({"s", "d"})


def sidecar_config(chains: dict[str, tuple[str, str]]) -> str:
    lines = ["chains:"]
    for name, (cls, on_error) in chains.items():
        lines.append(f'  {name}: {{on_error: {on_error}, plugins: ["{DP}{cls}"]}}')
    return "\n".join(lines) + "\n"


# ---- the generator -------------------------------------------------------------------------------------


@dataclass
class Case:
    ident: str
    chain: str
    shape: str
    script: dict[str, Any]

    @property
    def path(self) -> str:
        return f"/{self.chain}/case/{self.ident}"

    def header(self) -> str:
        return base64.urlsafe_b64encode(json.dumps(self.script, separators=(",", ":")).encode()).decode()


_NAMES = ("x-gen", "x-client", "x-multi", "set-cookie", "content-type", "cache-control")
_VALUES = ("v1", "", "a b", "\u00ff latin-1", "x" * 300, 'quoted "value"', "tab\tinside")
# What Envoy would refuse, strip, drop or cut: each is the plugin's error at the hook (issue 14).
_REFUSED_SETS = (
    ("x-bad", " leading"),
    ("x-bad", "trailing "),
    ("x-bad", "line\r\nbreak"),
    ("x-bad", "nul\x00"),
    ("x-bad", "\u2603"),
    ("bad name", "v"),
    ("bad:name", "v"),
    ("content-length", "3"),
    ("connection", "close"),
    ("transfer-encoding", "gzip"),
    ("upgrade", "h2c"),
)
# What Envoy's default mutation rules reject (the request goes on; the change is counted).
_REJECTED_REQUEST = (("x-envoy-gen", "1"), ("host", "elsewhere.test"), (":authority", "elsewhere.test"))
_STATUSES = (200, 201, 204, 302, 304, 401, 403, 404, 413, 429, 500, 503)
_REPLY_HEADERS: tuple[list[list[str]], ...] = (
    [],
    [["content-type", "application/json"]],
    [["www-authenticate", "Basic"], ["www-authenticate", "Bearer"]],
    [["set-cookie", "a=1"], ["set-cookie", "b=2"], ["x-reply", "r"]],
    [["content-length", "6"]],
)
_REPLY_BODIES = ("", "denied", '{"error":"x"}', "long " * 200)
_METADATA_VALUES: tuple[Any, ...] = (1, 2.5, -7, "text", True, None, [1, "a"], {"n": 3, "s": "x"}, 10**12)


def _reply_op(rng: random.Random) -> list[Any]:
    return ["respond", rng.choice(_STATUSES), rng.choice(_REPLY_HEADERS), rng.choice(_REPLY_BODIES)]


def _header_script(rng: random.Random, direction: str) -> list[list[Any]]:
    ops: list[list[Any]] = []
    for _ in range(rng.randint(0, 3)):
        roll = rng.random()
        if roll < 0.35:
            ops.append(["set", rng.choice(_NAMES), rng.choice(_VALUES)])
        elif roll < 0.55:
            ops.append(["append", rng.choice(_NAMES), rng.choice(_VALUES[:4])])
        elif roll < 0.65:
            ops.append(["remove", rng.choice(_NAMES)])
        elif roll < 0.75:
            namespace = rng.choice(["envoy-sidecar", "envoy-sidecar", "other-ns", "undeclared-ns"])
            ops.append(["meta", f"k{rng.randint(0, 3)}", rng.choice(_METADATA_VALUES), namespace])
        elif roll < 0.82:
            ops.append(["set", *rng.choice(_REFUSED_SETS)])
        elif direction == "request" and roll < 0.9:
            ops.append(["set", *rng.choice(_REJECTED_REQUEST)])
        elif direction == "request":
            ops.append(["set", ":path", "/rewritten" + rng.choice(["", "?q=1"])])
        else:
            ops.append(["set", ":status", rng.choice(["404", "abc", "201", "99"])])
    end = rng.random()
    if end < 0.12:
        ops.append(_reply_op(rng))
    elif end < 0.17:
        ops.append(["raise"])
    return ops


def _body_script(rng: random.Random, duplex: bool, direction: str) -> list[Any] | None:
    roll = rng.random()
    if roll < 0.3:
        return None
    if roll < 0.5:
        return ["upper"]
    if roll < 0.65:
        return ["suffix", rng.choice(["!", " [appended]"])]
    if roll < 0.72:
        return ["clear"]
    if duplex and roll < 0.8:
        return ["meta", f"{direction}-end", rng.choice(_METADATA_VALUES)]
    at = rng.choice(["first", "end"])
    if duplex or roll < 0.82:
        return ["raise", at]
    return [*_reply_op(rng), at]


def generate(seed: int, count: int, *, duplex_share: float = 0.15) -> list[Case]:
    """`count` cases, the same for the same seed. About `duplex_share` of them use the FULL_DUPLEX chain."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        duplex = rng.random() < duplex_share
        chain = rng.choice(sorted(DUPLEX_CHAINS) if duplex else sorted(CHAINS))
        script: dict[str, Any] = {
            "request_headers": _header_script(rng, "request"),
            "response_headers": _header_script(rng, "response"),
        }
        if chain not in ("h", "ho"):
            script["request_body"] = _body_script(rng, duplex, "request")
            script["response_body"] = _body_script(rng, duplex, "response")
        cases.append(Case(f"{seed}-{i}", chain, rng.choice(SHAPES), script))
    return cases


# ---- observations ---------------------------------------------------------------------------------------


@dataclass
class Observation:
    """What one run of a case showed a user."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    cut: bool
    #: None: the upstream never saw the request; "partial": it saw the headers (and perhaps some body)
    #: of an upload answered early; else (method, path, headers, body).
    upstream: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    rejected: int = 0


def driver_request(case: Case) -> tuple[Any, Any]:
    from sidecar.testing import Request, Response

    headers = [*CLIENT_HEADERS, ("x-diff", case.header()), ("x-diff-id", case.ident)]
    body: list[bytes] = []
    if case.shape in ("post", "h2"):
        headers.append(("content-length", str(len(b"".join(UPLOAD)))))
        body = list(UPLOAD)
    elif case.shape == "chunked":
        headers.append(("transfer-encoding", "chunked"))
        body = list(UPLOAD)
    method = "GET" if case.shape == "get" else "POST"
    response_headers = list(UPSTREAM_HEADERS)
    if case.shape == "chunked":  # the upstream answers a chunked upload with a chunked response
        response_headers.append(("transfer-encoding", "chunked"))
    else:
        response_headers.append(("content-length", str(len(b"".join(DOWNLOAD)))))
    return Request(method, case.path, headers, body), Response(200, response_headers, list(DOWNLOAD))


def observe_driver(driver: Any, case: Case) -> Observation:
    request, response = driver_request(case)
    result = driver.run(request, response)
    upstream: Any = None
    if result.upstream is not None:
        if not result.upstream.complete:
            upstream = "partial"
        else:
            up = result.upstream.headers
            upstream = (up[":method"], up[":path"], _upstream_headers(up.items_all()), result.upstream.body)
    return Observation(
        status=result.status,
        headers=_client_headers(result.response.headers.items_all()),
        body=result.response.body,
        cut=result.cut,
        upstream=upstream,
        metadata=result.dynamic_metadata,
        rejected=len(result.rejected_mutations),
    )


# Framing, and what Envoy or the HTTP client adds on its own: not the plugin's doing (docs/testing.md).
_CLIENT_SKIP = frozenset({"date", "server", "x-envoy-upstream-service-time", "transfer-encoding", "connection"})
_UPSTREAM_SKIP = frozenset(
    {
        "host",
        "x-request-id",
        "x-forwarded-proto",
        "x-envoy-expected-rq-timeout-ms",
        "content-length",
        "transfer-encoding",
        "connection",
        "user-agent",
        "accept",
        "accept-encoding",
    }
)


def _fields(items: list[tuple[str, str]], skip: frozenset[str]) -> list[tuple[str, str]]:
    """Header fields as a peer means them: repeated lines of a name joined with "," and empty list members
    dropped (RFC 9110 5.3 and 5.6.1: the same field; Envoy joins the values of the headers it keeps inline,
    such as content-type, and drops an empty one), except set-cookie, whose lines stay apart (5.3)."""
    values: dict[str, list[str]] = {}
    cookies = []
    for name, value in items:
        name = name.lower()
        if name.startswith(":") or name in skip:
            continue
        if name == "x-sidecar-error-id":
            value = "<id>"  # a new id per failure
        if name == "set-cookie":
            cookies.append((name, value))
        else:
            values.setdefault(name, []).append(value)
    joined = [(name, ",".join(v for v in vals if v)) for name, vals in values.items()]
    return sorted(joined + cookies)


def _client_headers(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return _fields(items, _CLIENT_SKIP)


def _upstream_headers(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return _fields(items, _UPSTREAM_SKIP)


# ---- the real side ------------------------------------------------------------------------------------


@dataclass
class Seen:
    """What the recording upstream got for one case."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # Envoy resets uploads answered early: expected here, not worth a traceback


class RecordingUpstream:
    """An HTTP/1.1 upstream that records each request by `x-diff-id` and answers with DOWNLOAD, framed by
    content-length, or chunked when the request came chunked (what `driver_request` tells the Driver)."""

    def __init__(self) -> None:
        self.seen: dict[str, Seen] = {}
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def _handle(self) -> None:
                ident = self.headers.get("x-diff-id", "")
                record = Seen(self.command, self.path, [(k.lower(), v) for k, v in self.headers.items()])
                with upstream.lock:
                    upstream.seen[ident] = record
                chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
                if chunked:
                    record.body, record.complete = _read_chunked(self.rfile)
                else:
                    length = int(self.headers["content-length"] or 0)
                    record.body = self.rfile.read(length)
                    record.complete = len(record.body) == length
                if not record.complete:
                    return  # reset mid-upload: nothing to answer
                self.send_response(200)
                for name, value in UPSTREAM_HEADERS:
                    self.send_header(name, value)
                if chunked:
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for piece in DOWNLOAD:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("content-length", str(len(b"".join(DOWNLOAD))))
                    self.end_headers()
                    self.wfile.write(b"".join(DOWNLOAD))

            def do_GET(self) -> None:
                with contextlib.suppress(OSError, ValueError):
                    self._handle()

            do_POST = do_GET

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> RecordingUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _read_chunked(rfile: Any) -> tuple[bytes, bool]:
    """The body of a chunked request, and whether it ended with its last chunk (not a reset)."""
    body = b""
    while True:
        line = rfile.readline()
        if not line.endswith(b"\n"):
            return body, False  # the connection ended mid-body
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (line := rfile.readline()) not in (b"\r\n", b"\n"):
                if not line:
                    return body, False
            return body, True
        piece = rfile.read(size)
        body += piece
        if len(piece) < size or not rfile.readline():
            return body, False


def access_log_hook(path: Path) -> Any:
    """A bootstrap hook: one access log line per request with its case id and the plugins' metadata."""

    def hook(bootstrap: dict[str, Any]) -> None:
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(path),
                    "log_format": {
                        "json_format": {
                            "id": "%REQ(X-DIFF-ID)%",
                            "envoy-sidecar": "%DYNAMIC_METADATA(envoy-sidecar)%",
                            "other-ns": "%DYNAMIC_METADATA(other-ns)%",
                        }
                    },
                },
            }
        ]

    return hook


def read_access_log(path: Path) -> dict[str, dict[str, Any]]:
    """Case id -> {namespace: metadata} from the access log."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        ident = entry.pop("id")
        out[ident] = {ns: value for ns, value in entry.items() if value not in (None, "-", {})}
    return out


def _upload() -> Iterator[bytes]:
    yield from UPLOAD


def observe_envoy(clients: dict[str, Any], env: Any, upstream: RecordingUpstream, case: Case) -> Observation:
    """Send the case through real Envoy; the metadata is filled in later from the access log."""
    import httpx

    headers = [*CLIENT_HEADERS, ("x-diff", case.header()), ("x-diff-id", case.ident)]
    client = clients["h2" if case.shape == "h2" else "h1"]
    content: Any = None
    if case.shape in ("post", "h2"):
        content = b"".join(UPLOAD)
    elif case.shape == "chunked":
        content = _upload()
    before = _rejected(env)
    body = b""
    cut = False
    with client.stream("GET" if case.shape == "get" else "POST", case.path, headers=headers, content=content) as reply:
        try:
            for piece in reply.iter_raw():
                body += piece
        except httpx.HTTPError:  # reset or closed mid-body: the response was cut
            cut = True
        status, reply_headers = reply.status_code, list(reply.headers.multi_items())
    client.cookies.clear()  # every case starts as a new client: no cookie from an earlier reply
    with upstream.lock:
        seen = upstream.seen.pop(case.ident, None)
    real_upstream: Any = None
    if seen is not None:
        if not seen.complete:
            real_upstream = "partial"
        else:
            path = seen.path
            real_upstream = (seen.method, path, _upstream_headers(seen.headers), seen.body)
    return Observation(
        status=status,
        headers=_client_headers(reply_headers),
        body=body,
        cut=cut,
        upstream=real_upstream,
        rejected=_rejected(env) - before,
    )


def _rejected(env: Any) -> int:
    counters = env.envoy.stats("rejected_header_mutations")
    return sum(value for name, value in counters.items() if name.endswith("rejected_header_mutations"))


# ---- comparison ---------------------------------------------------------------------------------------


def compare(driver: Observation, envoy: Observation, *, streams_response: bool = False) -> list[str]:
    """The substantive differences between the two runs of a case, after normalisation (docs/testing.md)."""
    problems = []
    # A reply or failure in a STREAMED or FULL_DUPLEX response body: when the whole upstream body came before
    # the response headers were answered, Envoy still holds the headers (and sends the body as one chunk),
    # so the reply replaces the response; otherwise the client has the upstream's headers and gets a reset.
    # A race in Envoy: either agrees with the Driver on what the client sees.
    race = streams_response and driver.cut != envoy.cut
    if not race:
        problems += _client_differences(driver, envoy)
    if driver.upstream == "partial":
        # The upstream had the headers when the reply came; whether they (or some body) arrived before the
        # reset is a race: nothing, or part of the request, both agree.
        if envoy.upstream not in (None, "partial"):
            problems.append(f"upstream: driver partial, envoy {envoy.upstream}")
    elif driver.upstream != envoy.upstream:
        problems.append(f"upstream: driver {driver.upstream}, envoy {envoy.upstream}")
    if driver.rejected != envoy.rejected:
        problems.append(f"rejected mutations: driver {driver.rejected}, envoy {envoy.rejected}")
    if driver.metadata != envoy.metadata:
        problems.append(f"metadata: driver {driver.metadata}, envoy {envoy.metadata}")
    return problems


def _client_differences(driver: Observation, envoy: Observation) -> list[str]:
    problems = []
    if driver.status != envoy.status:
        problems.append(f"status: driver {driver.status}, envoy {envoy.status}")
    if driver.cut != envoy.cut:
        problems.append(f"cut: driver {driver.cut}, envoy {envoy.cut}")
    ours = [(n, v) for n, v in driver.headers if n != "content-length"]
    theirs = [(n, v) for n, v in envoy.headers if n != "content-length"]
    if ours != theirs:
        problems.append(f"client headers: driver {ours}, envoy {theirs}")
    # A length is compared where both have one (HTTP/2 and chunked responses carry none).
    ours_length = dict(driver.headers).get("content-length")
    theirs_length = dict(envoy.headers).get("content-length")
    if ours_length is not None and theirs_length is not None and ours_length != theirs_length:
        problems.append(f"content-length: driver {ours_length}, envoy {theirs_length}")
    if driver.cut:
        if not driver.body.startswith(envoy.body):  # a reset loses what was in flight
            problems.append(f"cut body: envoy {envoy.body!r} is not a prefix of driver {driver.body!r}")
    elif driver.body != envoy.body:
        problems.append(f"client body: driver {driver.body!r}, envoy {envoy.body!r}")
    return problems


@dataclass
class Tally:
    cases: int = 0
    agreed: int = 0
    #: Agreed cases where Envoy's documented race decided what the client saw (docs/testing.md).
    races: int = 0
    disagreements: list[tuple[Case, list[str]]] = field(default_factory=list)


def run_batch(cases: list[Case], env: Any, upstream: RecordingUpstream, log: Path, registry: Any) -> Tally:
    """Every case through the Driver and through `env` (started with `access_log_hook(log)` in front of
    `upstream`); the tally of agreements."""
    import httpx

    from sidecar.testing import Driver
    from tests.support.wait import wait_for

    drivers = {name: Driver(registry, chain=name) for name in registry.chains}
    tally = Tally()
    observed: list[tuple[Case, Observation, Observation]] = []
    with (
        httpx.Client(base_url=env.url, timeout=20, http1=True, http2=False) as h1,
        httpx.Client(base_url=env.url, timeout=20, http1=False, http2=True) as h2,
    ):
        clients = {"h1": h1, "h2": h2}
        for case in cases:
            ours = observe_driver(drivers[case.chain], case)
            observed.append((case, ours, observe_envoy(clients, env, upstream, case)))
    wait_for(lambda: len(read_access_log(log)) >= len(cases), 20, "an access log line per case")
    metadata = read_access_log(log)
    for case, ours, theirs in observed:
        theirs.metadata = metadata.get(case.ident, {})
        streams_response = case.chain in STREAMING_CHAINS
        problems = compare(ours, theirs, streams_response=streams_response)
        tally.cases += 1
        if problems:
            tally.disagreements.append((case, problems))
        else:
            tally.agreed += 1
            tally.races += streams_response and ours.cut != theirs.cut
    return tally


def run_cases(cases: list[Case], duplex: bool, workdir: Path, start: Any) -> Tally:
    """The cases of one kind (FULL_DUPLEX or not) through one Envoy and one sidecar that `start(**kwargs)`
    starts (the `sidecar_envoy` fixture, or `EnvoyHarness(**kwargs).start()`), and through the Driver."""
    from sidecar.chains import Registry
    from sidecar.config import load_config

    chains = DUPLEX_CHAINS if duplex else CHAINS
    cases = [case for case in cases if (case.chain in DUPLEX_CHAINS) == duplex]
    config = workdir / ("sidecar-duplex.yaml" if duplex else "sidecar.yaml")
    config.write_text(sidecar_config(chains))
    log = workdir / ("access-duplex.log" if duplex else "access.log")
    upstream = RecordingUpstream().start()
    try:
        env = start(
            config=config,
            upstream=upstream.address,
            routes=[f"/{name}/={name}" for name in chains],
            bootstrap_hook=access_log_hook(log),
        )
        return run_batch(cases, env, upstream, log, Registry.from_specs(load_config(config).chains))
    finally:
        upstream.stop()


def report(tally: Tally) -> str:
    return "\n".join(f"{case.ident} {case.chain} {case.shape} {case.script}: {p}" for case, p in tally.disagreements)
