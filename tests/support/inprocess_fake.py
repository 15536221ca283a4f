"""A stand-in for the bridge (`sidecar.inprocess.bridge:configure`) that exercises every Result kind of the
in-process contract, so the native module can be tested against real Envoy on its own.

The filter config's `chain` picks the phases and body modes (`CHAINS`); the request's `:path` picks what each
hook returns (`_Stream`). Nothing here is a plugin: it returns Results directly, well-formed or not.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

__all__ = ["CHAINS", "FACTORY", "MALFORMED", "Counters", "configure"]

FACTORY = "tests.support.inprocess_fake:configure"

# chain -> (phases bitmask, request body mode, response body mode); modes: 0 none, 1 buffered, 2 streamed.
CHAINS: dict[str, tuple[int, int, int]] = {
    "headers": (1 | 8, 0, 0),
    # For benchmarks/inprocess_native.py: the module loaded but Python never called; hooks that return None;
    # one header set in each direction.
    "none": (0, 0, 0),
    "noop": (1 | 8, 0, 0),
    "stamp": (1 | 8, 0, 0),
    "buffered": (63, 1, 1),
    "streamed": (63, 2, 2),
    "partial": (63, 3, 3),
}

Result = Any
Header = tuple[str, bytes]  # what Envoy's maps arrive as
ReplyHeader = tuple[bytes, bytes]  # what a Result carries back

_HUGE = 9 * 1024 * 1024  # over the module's default max_body_bytes (8 MiB)


def _nested(depth: int) -> Any:
    """A list nested `depth` deep (the module takes 16)."""
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def _self_containing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


#: Nested metadata values the module must set as real Struct values, by key (`/metadata-nested`).
NESTED: dict[str, Any] = {
    "dict": {"user": "ada", "roles": ["admin", "dev"], "quota": {"left": 3, "ratio": 0.25, "on": True}},
    "list": [1, "two", None, False, [], {}],
    "none": None,
    "empty": {},
    "deep": _nested(16),
    "unicode": {"clé": "välue ☃"},
}

#: Results the native module must refuse (500, `sidecar_inprocess_error`), by index in `/malformed/N`.
MALFORMED: list[Any] = [
    (),
    (0,),
    (0, (), None),
    (0, (), None, None, None),
    (3,),
    (-1,),
    (True,),
    [0, (), None, None],
    "continue",
    42,
    (2, None),
    (1, 403),
    (1, 403, (), b"", "x", "extra"),
    (1, 403, (), b"", "d"),  # the 5-element RESPOND of round 1: no metadata slot
    (1, 403, (), b"", "d", None, None),
    (1, 403, (), b"", "d", (("ns", "k", float("nan")),)),
    (1, 403, (), b"", "d", [("ns", "k", "v")]),
    (1, 99, (), b"", "d", None),
    (1, 600, (), b"", "d", None),
    (1, "403", (), b"", "d", None),
    (1, 403, [], b"", "d", None),
    (1, 403, ((b"x-a",),), b"", "d", None),
    (1, 403, ((b"x-a", b"v\r\nx-injected: 1"),), b"", "d", None),
    (1, 403, ((b":status", b"200"),), b"", "d", None),
    (1, 403, (), "a str body", "d", None),
    (1, 403, (), b"", "two words", None),
    (1, 403, (), b"", b"bytes-details", None),
    (1, 403, (), b"", "d" * 200, None),
    (1, 403, (), b"x" * _HUGE, "d", None),
    (0, [], None, None),
    (0, ((0, b"x-a"),), None, None),
    (0, ((3, b"x-a", b"v"),), None, None),
    (0, ((True, b"x-a", b"v"),), None, None),
    (0, ((0, "x-a", b"v"),), None, None),
    (0, ((0, b"x-a", "v"),), None, None),
    (0, ((0, b"X-Upper", b"v"),), None, None),
    (0, ((0, b"", b"v"),), None, None),
    (0, ((0, b"x a", b"v"),), None, None),
    (0, ((0, b"x-a:", b"v"),), None, None),
    (0, ((0, b"x\x00a", b"v"),), None, None),
    (0, ((0, b"x-\xe9", b"v"),), None, None),
    (0, ((0, b"x-a", b"v\x01w"),), None, None),
    (0, ((0, b"x-a", b"v\x1bw"),), None, None),
    (1, 403, ((b"x\x00", b"v"),), b"", "d", None),
    (0, ((0, b"x-a", b"v\r\nx-injected: 1"),), None, None),
    (0, ((0, b"x-a", b"v\x00w"),), None, None),
    (0, ((0, b"x-a", b"v\n"),), None, None),
    (0, ((0, b"x-a", b" padded"),), None, None),
    (0, ((0, b"x-a", b"v" * 70_000),), None, None),
    (0, ((0, b"n" * 2000, b"v"),), None, None),
    (0, tuple((0, b"x-a", b"v") for _ in range(2000)), None, None),
    (0, ((2, b":path", None),), None, None),
    (0, ((1, b":method", b"GET"),), None, None),
    (0, ((0, b":foo", b"x"),), None, None),
    (0, ((0, b":status", b"99"),), None, None),
    (0, ((2, b"x-a", b"v"),), None, None),
    (0, ((0, b"x-a", None),), None, None),
    (0, (), b"a body in a headers phase", None),
    (0, (), b"x" * _HUGE, None),
    (0, (), "a str body", None),
    (0, (), None, (("ns", "k"),)),
    (0, (), None, (("ns", "k", float("nan")),)),
    (0, (), None, (("ns", "k", float("inf")),)),
    (0, (), None, (("ns", "k", 10**400),)),
    (0, (), None, ((b"ns", "k", "v"),)),
    (0, (), None, (("", "k", "v"),)),
    (0, (), None, [("ns", "k", "v")]),
    (0, (), None, tuple(("ns", f"k{i}", i) for i in range(200))),
    (0, (), None, (("ns", "k", "v" * 70_000),)),
    (0, (), None, (("ns", "k", b"bytes"),)),
    (0, (), None, (("ns", "k", {1: "int key"}),)),
    (0, (), None, (("ns", "k", {b"bytes key": 1}),)),
    (0, (), None, (("ns", "k", {"a": {"b": b"bytes deep"}}),)),
    (0, (), None, (("ns", "k", ["x", float("inf")]),)),
    (0, (), None, (("ns", "k", [10**400]),)),
    (0, (), None, (("ns", "k", ("a", "tuple")),)),
    (0, (), None, (("ns", "k", {"a", "set"}),)),
    (0, (), None, (("ns", "k", _nested(17)),)),
    (0, (), None, (("ns", "k", _self_containing()),)),
    (0, (), None, (("ns", "k", ["v" * 1000] * 100),)),
    (0, (), None, (("ns", "k", {f"k{i}": i for i in range(10_000)}),)),
    (0, (), None, (("ns", "k", {"\ud800": 1}),)),
    object(),
]


_BENCH: dict[str, Result] = {"noop": None, "stamp": (0, ((0, b"x-stamp", b"1"),), None, None)}


class Counters:
    """What the fake saw, shared by every config (one interpreter per Envoy)."""

    lock = threading.Lock()
    opened = 0
    closed = 0
    resumed = 0
    late_schedules = 0  # schedule() calls that found the stream gone (False)
    spinning = 0  # hooks spinning in Python right now

    @classmethod
    def snapshot(cls) -> dict[str, int]:
        with cls.lock:
            return {
                "opened": cls.opened,
                "closed": cls.closed,
                "resumed": cls.resumed,
                "late": cls.late_schedules,
                "spinning": cls.spinning,
            }


class _Config:
    def __init__(self, doc: dict[str, Any], native: types.ModuleType) -> None:
        self.phases, self.request_body_mode, self.response_body_mode = CHAINS[doc["chain"]]
        self.releases_early = 0  # the fake's streams go PENDING and count their closes at destroy
        self.chain: str = doc["chain"]
        self.native = native

    def new_stream(self, handle: int) -> _Stream:
        with Counters.lock:
            Counters.opened += 1
        return _Stream(self, handle)


def configure(filter_config_json: str, native: types.ModuleType) -> _Config:
    doc = json.loads(filter_config_json)
    if sys.modules.get("sidecar_inprocess_native") is not native:
        raise RuntimeError("fake: the native module is not sys.modules['sidecar_inprocess_native']")
    if doc.get("chain") not in CHAINS:
        raise ValueError(f"fake: unknown chain {doc.get('chain')!r}")
    return _Config(doc, native)


def _get(headers: list[Header], name: str) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


def _request_ids(headers: list[Header], handed: bytes | None) -> bytes:
    """/request-id: the request id the module handed over, and the first x-request-id in the list (JSON)."""
    listed = _get(headers, "x-request-id")
    ids = {"handed": None if handed is None else handed.decode(), "listed": listed and listed.decode()}
    return json.dumps(ids).encode()


#: /shared-pairs: the (name, value) pairs of the last such request, by name.
_LAST_PAIRS: dict[str, Header] = {}


def _same_pairs(headers: list[Header]) -> dict[str, bool]:
    """Per name: whether the module handed over the very pair object of the last /shared-pairs request."""
    same = {name: _LAST_PAIRS.get(name) is pair for pair in headers for name in (pair[0],)}
    _LAST_PAIRS.clear()
    _LAST_PAIRS.update((pair[0], pair) for pair in headers)
    return same


def _respond(
    status: int, details: str, body: bytes = b"", headers: tuple[ReplyHeader, ...] = (), metadata: Any = None
) -> Result:
    return (1, status, headers, body, details, metadata)


def _hog(make: Callable[[], object]) -> Result:
    """Allocates `make()` objects until Python refuses (the module's memory budget): MemoryError escapes."""
    kept = []
    while True:
        kept.append(make())


#: What /hog-keep keeps between requests (a plugin that leaks to the budget, then holds on).
_HOARD: list[bytearray] = []


#: /hog-keep's answer, made before any hoarding: returning it allocates nothing. The upstream sees the header only
#: if every size ended in a MemoryError, the budget's refusal (the loops end no other way).
_HOARDED = (0, ((0, b"x-hoarded", b"1"),), None, None)


def _hog_keep() -> Result:
    """Allocates until Python refuses, in ever smaller pieces down to 64 bytes, keeps it all, and answers with
    one header."""
    for size in (1 << 20, 1 << 16, 1 << 12, 1 << 6):
        try:
            while True:
                _HOARD.append(bytearray(size))
        except MemoryError:
            pass
    return _HOARDED


def _hog_grow() -> Result:
    """One str grown in place (realloc) until Python refuses."""
    grown = ""
    while True:
        grown += "x" * 65536


class _Stream:
    # Made by _storm() only: a threading.Event costs about 3 us (its Condition probes its Lock for methods it lacks,
    # three AttributeErrors), more than the native module's own work per request in benchmarks/inprocess_native.py.
    in_resume: threading.Event
    storm_over: threading.Event

    def __init__(self, config: _Config, handle: int) -> None:
        self.config = config
        self.handle = handle
        self.path = b""
        self.chunks = 0
        self.body_bytes = 0
        self.last_end = False
        self.waiting: Result = None
        self.ready = True  # the work behind the current PENDING is done (resume() before that is a bug)
        self.resumed_once = False
        self.storming = False

    # -- PENDING: the answer comes from another thread, as an async hook's would --------------------------------
    def _later(self, result: Result, delay_ms: int, schedule: bool = True) -> Result:
        self.waiting = result
        self.ready = False

        def wake() -> None:
            self.ready = True
            if not self.config.native.schedule(self.handle):
                with Counters.lock:
                    Counters.late_schedules += 1

        if schedule:
            timer = threading.Timer(delay_ms / 1000, wake)
            timer.daemon = True
            timer.start()
        return (2,)

    def _storm(self) -> Result:
        """PENDING, then 1,000 schedule() calls from 4 threads: one resume."""
        self.in_resume = threading.Event()
        self.storm_over = threading.Event()
        self.waiting = None
        self.ready = True
        self.storming = True
        threads = [threading.Thread(target=self._wake_storm, daemon=True) for _ in range(4)]

        def over() -> None:
            for thread in threads:
                thread.join(10)
            self.storm_over.set()

        for thread in threads:
            thread.start()
        threading.Thread(target=over, daemon=True).start()
        return (2,)

    def _wake_storm(self) -> None:
        for _ in range(250):
            self.config.native.schedule(self.handle)
        # Then more while resume() runs (it waits for them, the GIL let go): wakes for the phase that is ending,
        # which must not carry over to the next one.
        if self.in_resume.wait(10):
            for _ in range(50):
                self.config.native.schedule(self.handle)

    def _garbage(self) -> list[str]:
        """What schedule() says to handles and values that are not this stream's."""
        seen = []
        for value in (0, 1, self.handle + 1, self.handle ^ (1 << 32), (1 << 64) - 1, -1, 1 << 64, "x", None, 1.5):
            try:
                seen.append(repr(self.config.native.schedule(value)))
            except (TypeError, OverflowError) as error:
                seen.append(type(error).__name__)
        return seen

    def resume(self) -> Result:
        with Counters.lock:
            Counters.resumed += 1
        self.resumed_once = True
        if self.storming:
            self.storming = False
            self.in_resume.set()
            self.storm_over.wait(10)
        if not self.ready:
            return (0, ((0, b"x-resumed-early", b"1"),), None, None)
        result, self.waiting = self.waiting, None
        return result

    def close(self) -> None:
        with Counters.lock:
            Counters.closed += 1

    # -- request ---------------------------------------------------------------------------------------------------
    def request_headers(self, headers: list[Header], end_of_stream: bool, request_id: bytes | None = None) -> Result:
        if self.config.chain in _BENCH:
            return _BENCH[self.config.chain]
        self.path = _get(headers, ":path") or b""
        path = self.path.split(b"?")[0]
        stamp = (0, ((0, b"x-fake-req", b"1"), (1, b"x-fake-append", b"a"), (2, b"x-remove-me", None)), None, None)
        delay = int(_get(headers, "x-delay-ms") or b"0")
        actions: dict[bytes, Callable[[], Result]] = {
            b"/ok": lambda: stamp,
            b"/respond": lambda: _respond(403, "fake_denied", b"denied\n", ((b"x-denied", b"yes"),)),
            b"/raise": self._raise,
            b"/metadata": lambda: (
                0,
                (),
                None,
                (
                    ("sidecar.fake", "str", "v"),
                    ("sidecar.fake", "num", 7),
                    ("sidecar.fake", "flag", True),
                    ("sidecar.fake", "ratio", 0.5),
                ),
            ),
            b"/metadata-nested": lambda: (
                0,
                (),
                None,
                (("sidecar.fake", "scalar", "kept"), *(("sidecar.fake", k, v) for k, v in NESTED.items())),
            ),
            b"/respond-metadata": lambda: _respond(
                403, "fake_denied", b"", (), (("sidecar.fake", "why", "denied"), ("sidecar.fake", "who", {"id": 7}))
            ),
            b"/pending-respond-metadata": lambda: self._later(
                _respond(451, "fake_pending_denied", metadata=(("sidecar.fake", "late", [1, 2]),)), delay
            ),
            b"/pending": lambda: self._later(stamp, delay),
            b"/pending-respond": lambda: self._later(_respond(451, "fake_pending_denied"), delay),
            b"/pending-never": lambda: self._later(None, 0, schedule=False),
            b"/pending-both": lambda: self._later(None, delay),
            b"/rewrite": lambda: (0, ((0, b":path", b"/rewritten"),), None, None),
            b"/pending-storm": self._storm,
            b"/pending-storm-twice": self._storm,
            b"/pending-storm-body": self._storm,
            b"/schedule-garbage": lambda: _respond(200, "fake_schedule", json.dumps(self._garbage()).encode()),
            b"/spin": self._spin,
            b"/spin-swallow-once": self._spin_swallowing_once,
            b"/hog-large": lambda: _hog(lambda: bytearray(1 << 20)),
            b"/hog-small": lambda: _hog(object),
            b"/hog-grow": _hog_grow,
            b"/hog-thread": self._hog_thread,
            b"/hog-keep": _hog_keep,
            b"/memory": lambda: _respond(200, "fake_memory", json.dumps(self.config.native.memory()).encode()),
            b"/sleep": lambda: time.sleep(1.0),
            b"/stats": lambda: _respond(200, "fake_stats", json.dumps(Counters.snapshot()).encode()),
            b"/echo-accept": lambda: _respond(200, "fake_echo", _get(headers, "accept") or b""),
            b"/shared-pairs": lambda: _respond(200, "fake_shared", json.dumps(_same_pairs(headers)).encode()),
            b"/request-id": lambda: _respond(200, "fake_request_id", _request_ids(headers, request_id)),
            b"/headers-seen": lambda: _respond(
                200,
                "fake_headers",
                json.dumps([[k, len(v)] for k, v in headers]).encode(),  # str names: bytes would not serialise
            ),
        }
        if path.startswith(b"/malformed/"):
            return MALFORMED[int(path.rsplit(b"/", 1)[1])]
        action = actions.get(path)
        return action() if action else None

    def _hog_thread(self) -> Result:
        """PENDING while another Python thread (as the bridge's event loop) allocates without bound: the budget is the
        interpreter's, every thread's. It catches its MemoryError and answers 507."""

        def hog() -> None:
            try:
                _hog(object)
            except MemoryError:
                self.waiting = _respond(507, "fake_hog_thread")
            self.ready = True
            self.config.native.schedule(self.handle)

        self.ready = False
        threading.Thread(target=hog, daemon=True).start()
        return (2,)

    def _raise(self) -> Result:
        raise RuntimeError("secret-token-0123")  # the module must not log this message

    def _spin(self) -> Result:
        with Counters.lock:
            Counters.spinning += 1
        try:
            while True:
                pass
        finally:
            with Counters.lock:
                Counters.spinning -= 1

    def _spin_swallowing_once(self) -> Result:
        """Catches the watchdog's first TimeoutError, as `except Exception` around a plugin's work does, and
        spins on: only a second interrupt stops it."""
        with contextlib.suppress(TimeoutError):
            self._spin()
        return self._spin()

    def request_body(self, chunk: bytes, end_of_stream: bool) -> Result:
        self.chunks += 1
        self.body_bytes += len(chunk)
        self.last_end = end_of_stream
        path = self.path.split(b"?")[0]
        if path in (b"/upper", b"/pending-upper", b"/pending-both", b"/pending-storm-body"):
            ops: tuple[Any, ...] = ()
            if self.config.request_body_mode == 1:
                ops = ((0, b"content-length", str(len(chunk)).encode()),)
            result = (0, ops, chunk.upper(), (("sidecar.fake", "body_calls", self.chunks),))
            return self._later(result, 50) if path != b"/upper" else result
        if path == b"/body-respond" and end_of_stream:
            return _respond(413, "fake_body_denied")
        if path == b"/chunk-respond":  # on the first chunk, whatever follows
            return _respond(403, "fake_chunk_denied", b"no\n", ((b"x-denied", b"chunk"),))
        if path == b"/partial-respond":
            return _respond(403, "fake_partial_denied", metadata=(("sidecar.fake", "seen", len(chunk)),))
        if path == b"/partial-upper":
            # The partial view upper-cased, its length in content-length's stead (headers are held for this call).
            seen = f"{len(chunk)} {'whole' if end_of_stream else 'partial'}".encode()
            return (0, ((0, b"x-partial-seen", seen),), chunk.upper(), None)
        if path.startswith(b"/malformed-body/"):
            return MALFORMED[int(path.rsplit(b"/", 1)[1])]
        if path == b"/body-header-op" and self.config.request_body_mode == 2:
            return (0, ((0, b"x-late", b"1"),), None, None)  # malformed: the headers already went on
        return None

    def request_trailers(self, trailers: list[Header]) -> Result:
        if _get(trailers, "x-deny") is not None:
            return _respond(403, "fake_trailer_denied")
        return (0, ((0, b"x-fake-trailer", b"1"),), None, None)

    # -- response --------------------------------------------------------------------------------------------------
    def response_headers(self, headers: list[Header], end_of_stream: bool) -> Result:
        if self.config.chain in _BENCH:
            return _BENCH[self.config.chain]
        path = self.path.split(b"?")[0]
        if path.startswith(b"/malformed-response/"):
            return MALFORMED[int(path.rsplit(b"/", 1)[1])]
        if path == b"/pending-storm-twice":
            # The request phase's storm is over (its last wakes came while nothing waited): only our own
            # schedule() may wake this phase.
            self.storm_over.wait(10)
            return self._later((0, ((0, b"x-fake-resp", b"late-but-right"),), None, None), 50)
        if path == b"/respond-response":
            return _respond(418, "fake_response_denied", b"teapot\n", ((b"x-teapot", b"1"),))
        ops = (
            (0, b"x-fake-resp", b"1"),
            (0, b"x-request-body-calls", str(self.chunks).encode()),
            (0, b"x-request-body-seen", f"{self.body_bytes} {'whole' if self.last_end else 'partial'}".encode()),
        )
        return (0, ops, None, None)

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Result:
        if self.config.chain == "partial":
            seen = f"{len(chunk)} {'whole' if end_of_stream else 'partial'}"
            return (0, (), None, (("sidecar.fake", "response_seen", seen),))
        if self.path.split(b"?")[0] == b"/resp-upper":
            ops: tuple[Any, ...] = ()
            if self.config.response_body_mode == 1:
                ops = ((0, b"content-length", str(len(chunk)).encode()),)
            return (0, ops, chunk.upper(), None)
        return None

    def response_trailers(self, trailers: list[Header]) -> Result:
        return None
