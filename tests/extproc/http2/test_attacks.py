"""Hostile peers against the native transport, one per limit and variants: each attack ends in its limit's
verdict (GOAWAY ENHANCE_YOUR_CALM and a metric reason, a refused stream, a call ended with
RESOURCE_EXHAUSTED), and a legitimate call on another connection is served while it runs.

Every attack is bounded in frames (`ATTACK_CHUNKS`) and time (`DEADLINE`); the same attacks against a
real `sidecar serve` of each transport are in tests/extproc/test_attacks.py."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from hyperframe import frame as hf

from sidecar.config import Limits
from sidecar.extproc.http2 import Call
from sidecar.extproc.http2.frames import MAX_CONCURRENT_STREAMS, PREFACE
from sidecar.extproc.http2.limits import CALL_COST
from tests.support.h2peers import (
    ATTACK_CHUNKS,
    CLIENT_HELLO,
    ECHO,
    PING,
    RawClient,
    assert_serves,
    attack,
    echo,
    grpc_frame,
    h2_client,
    new_streams,
    opening,
    raw_client,
    raw_frame,
    repeated,
    request_headers,
    serving,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.asyncio

ENHANCE_YOUR_CALM = 0xB
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, WINDOW_UPDATE, CONTINUATION = 0x0, 0x1, 0x2, 0x3, 0x4, 0x8, 0x9
U32 = struct.Struct(">I")
CANCEL = U32.pack(0x8)
WAITS = "/test.Wait/Wait"


def _stream_one(end_headers: bool = True) -> bytes:
    import hpack

    return opening(hpack.Encoder(), 1, end_headers=end_headers)


def _pings_with_progress() -> list[bytes]:
    # A message trickles in a byte a frame (work, which earns control-frame tokens) between PINGs whose
    # acks are never read: only the unread-replies limit can stop this one.
    first = _stream_one() + raw_frame(DATA, 0, 1, grpc_frame(b"x" * 3_000_000)[:5])
    unit = raw_frame(DATA, 0, 1, b"x") + raw_frame(PING, 0, 0, b"12345678") * 5
    return repeated(first, unit, 100)


#: attack -> (its chunks, whether the attacker reads what the server sends, the metric reason it must end
#: with (or reasons, separated by |), limits other than the defaults)
FLOODS: dict[str, tuple[Callable[[], list[bytes]], bool, str, Limits | None]] = {
    "empty DATA frames": (lambda: repeated(_stream_one(), raw_frame(DATA, 0, 1), 100), True, "empty_frames", None),
    "DATA frames of padding only": (
        lambda: repeated(_stream_one(), raw_frame(DATA, 0x8, 1, b"\x04\0\0\0\0"), 100),
        True,
        "empty_frames",
        None,
    ),
    "empty CONTINUATION frames": (
        lambda: repeated(_stream_one(end_headers=False), raw_frame(CONTINUATION, 0, 1), 100),
        True,
        "empty_frames",
        None,
    ),
    "empty HEADERS frames on new streams": (
        lambda: new_streams(lambda encoder, sid: raw_frame(HEADERS, 0x4, sid)),
        True,
        "rapid_reset",  # each opens a stream (progress), which is answered 415 at once
        None,
    ),
    "rapid reset": (
        lambda: new_streams(lambda encoder, sid: opening(encoder, sid) + raw_frame(RST_STREAM, 0, sid, CANCEL)),
        True,
        "rapid_reset",
        None,
    ),
    "rapid reset after a whole message": (
        lambda: new_streams(
            lambda encoder, sid: (
                opening(encoder, sid)
                + raw_frame(DATA, 0, sid, grpc_frame(b"work?"))
                + raw_frame(RST_STREAM, 0, sid, CANCEL)
            )
        ),
        True,
        "rapid_reset",
        None,
    ),
    "streams past the concurrency limit": (
        lambda: new_streams(opening, per_chunk=100, chunks=40),
        True,
        "rapid_reset",
        None,
    ),
    "requests for an unknown method": (
        lambda: new_streams(lambda encoder, sid: opening(encoder, sid, path="/no.Such/Method")),
        True,
        "rapid_reset",
        None,
    ),
    "requests that are not gRPC": (
        lambda: new_streams(lambda encoder, sid: opening(encoder, sid, content_type=b"text/plain")),
        True,
        "rapid_reset",
        None,
    ),
    "PING flood": (lambda: repeated(b"", raw_frame(PING, 0, 0, b"12345678"), 100), True, "control_frames", None),
    "SETTINGS flood": (lambda: repeated(b"", raw_frame(SETTINGS, 0, 0), 100), True, "control_frames", None),
    "SETTINGS that change the window of many streams": (
        lambda: (
            [new_streams(opening, per_chunk=500, chunks=1)[0]]
            + [
                raw_frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 70_000 + i % 2)) * 50
                for i in range(ATTACK_CHUNKS - 1)
            ]
        ),
        True,
        "control_frames|unread_replies",  # the acks are read, but slower than they are made
        None,
    ),
    "unsolicited SETTINGS acks": (
        lambda: repeated(b"", raw_frame(SETTINGS, 0x1, 0), 100),
        True,
        "control_frames",
        None,
    ),
    "WINDOW_UPDATE flood": (
        lambda: repeated(b"", raw_frame(WINDOW_UPDATE, 0, 0, U32.pack(1)), 100),
        True,
        "control_frames",
        None,
    ),
    "WINDOW_UPDATE flood on a stream": (
        lambda: repeated(_stream_one(), raw_frame(WINDOW_UPDATE, 0, 1, U32.pack(1)), 100),
        True,
        "control_frames",
        None,
    ),
    "PRIORITY flood": (
        lambda: repeated(b"", raw_frame(PRIORITY, 0, 3, b"\0\0\0\0\x10"), 100),
        True,
        "control_frames",
        None,
    ),
    "RST_STREAM for streams never opened": (
        lambda: repeated(b"", raw_frame(RST_STREAM, 0, 1, CANCEL), 100),
        True,
        "control_frames",
        None,
    ),
    "frames of unknown types": (lambda: repeated(b"", raw_frame(0xFA, 0, 0, b"x"), 100), True, "control_frames", None),
    "PING flood, acks never read": (
        lambda: repeated(b"", raw_frame(PING, 0, 0, b"12345678"), 500),
        False,
        "unread_replies",
        Limits(control_frame_burst=1_000_000),
    ),
    "PING flood with progress, acks never read": (_pings_with_progress, False, "unread_replies", None),
    "SETTINGS flood, acks never read": (
        lambda: repeated(b"", raw_frame(SETTINGS, 0, 0), 500),
        False,
        "unread_replies",
        Limits(control_frame_burst=1_000_000),
    ),
}


@pytest.mark.parametrize("case", FLOODS)
async def test_a_flood_ends_its_connection_while_others_are_served(tmp_path: Path, case: str) -> None:
    build, reads, reason, limits = FLOODS[case]
    errors: list[str] = []
    async with serving(tmp_path, {ECHO: echo}, limits=limits, on_error=errors.append) as (server, path):
        started = asyncio.Event()
        attacking = asyncio.create_task(attack(path, build(), read=reads, started=started))
        await started.wait()
        await assert_serves(path)  # on a connection of its own, while the attack goes on
        outcome = await attacking
        await assert_serves(path)
        assert outcome.closed, f"the server kept the connection after {outcome.sent} chunks"
        if reads:
            assert outcome.goaway == ENHANCE_YOUR_CALM
        assert {f"http2_{r}" for r in reason.split("|")} & set(errors), errors
        await wait_until(lambda: server.budget.used == 0)  # whatever the attack held was given back


async def test_a_healthy_client_is_never_taken_for_a_flood(tmp_path: Path) -> None:
    """Many calls, each with PINGs, WINDOW_UPDATEs and a cancelled call or two: no limit trips."""

    async def reader(call: Call) -> None:
        await call.read()
        await call.send(b"ok")
        await asyncio.Event().wait()  # until the client cancels it

    errors: list[str] = []
    routes = {ECHO: echo, "/test.R/Once": reader}
    async with serving(tmp_path, routes, on_error=errors.append) as (_, path), h2_client(path) as client:
        for round_ in range(30):
            ids = [client.start() for _ in range(20)]
            for sid in ids:
                client.send(sid, grpc_frame(b"m" * 2000), end_stream=True)
            client.h2.ping(b"%08d" % round_)
            cancelled = client.start("/test.R/Once")
            client.send(cancelled, grpc_frame(b"q"))
            await client.until(partial(lambda sid: bool(client.body[sid]), cancelled))
            client.h2.reset_stream(cancelled)  # cancelled after its handler did work: not premature
            client.flush()
            for sid in ids:
                assert (await client.finish(sid))[b"grpc-status"] == b"0"
    assert not errors


async def test_a_slow_preface_is_cut_off_by_the_handshake_timeout(tmp_path: Path) -> None:
    errors: list[str] = []
    limits = Limits(handshake_timeout=0.3)
    async with serving(tmp_path, {ECHO: echo}, limits=limits, on_error=errors.append) as (_, path):
        async with raw_client(path, preface=False) as raw:
            reading = asyncio.create_task(raw.read_to_eof())
            for byte in PREFACE[:-1]:
                if reading.done():
                    break
                raw.write(bytes([byte]))
                await asyncio.sleep(0.05)  # the attacker's pace, not a wait for the server
            await reading
        assert [f.error_code for f in raw.of(hf.GoAwayFrame)] == [ENHANCE_YOUR_CALM]
        await assert_serves(path)
    assert errors == ["http2_handshake_timeout"]


UNFINISHED = {
    "the preface, then no SETTINGS": (PREFACE, [], "http2_handshake_timeout"),
    "a PING before SETTINGS": (PREFACE + raw_frame(PING, 0, 0, b"12345678"), [], "http2_protocol_error"),
    "HEADERS without END_HEADERS, then nothing": (
        CLIENT_HELLO,
        [_stream_one(end_headers=False)],
        "http2_header_timeout",
    ),
}


@pytest.mark.parametrize("case", UNFINISHED)
async def test_a_handshake_or_header_block_left_unfinished_ends_the_connection(tmp_path: Path, case: str) -> None:
    hello, chunks, reason = UNFINISHED[case]
    errors: list[str] = []
    limits = Limits(handshake_timeout=0.3)
    async with serving(tmp_path, {ECHO: echo}, limits=limits, on_error=errors.append) as (_, path):
        outcome = await attack(path, chunks, hello=hello, read=False, probe=False)
        await assert_serves(path)
    assert outcome.closed
    assert outcome.goaway in (ENHANCE_YOUR_CALM, 0x1)
    assert errors == [reason]


async def test_an_idle_connection_gets_a_graceful_goaway(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(call: Call) -> None:
        await release.wait()
        await call.send((await call.read()) or b"")

    limits = Limits(idle_timeout=0.2, handshake_timeout=0.5)
    errors: list[str] = []
    async with (
        serving(tmp_path, {ECHO: slow}, limits=limits, on_error=errors.append) as (_, path),
        raw_client(path) as idle,
        raw_client(path) as busy,
    ):
        busy.send(hf.HeadersFrame(1, busy.block(request_headers()), flags=["END_HEADERS"]))
        await idle.read_to_eof()  # it acks the server's PING (RawClient does), so the close is clean
        assert [(g.last_stream_id, g.error_code) for g in idle.of(hf.GoAwayFrame)] == [(2**31 - 1, 0), (0, 0)]
        # The busy connection has an open stream: never idle, it is served when its handler goes on.
        release.set()
        busy.send(hf.DataFrame(1, grpc_frame(b"late"), flags=["END_STREAM"]))
        assert (await busy.finish(1))[b"grpc-status"] == b"0"
        assert busy.messages(1) == [b"late"]
        assert not busy.of(hf.GoAwayFrame)
    assert not errors  # an idle close is no error


async def test_a_peer_that_ignores_the_idle_goaway_is_closed(tmp_path: Path) -> None:
    limits = Limits(idle_timeout=0.2, handshake_timeout=0.3)
    async with serving(tmp_path, {ECHO: echo}, limits=limits) as (server, path):
        outcome = await attack(path, [], probe=False)  # it never acks the PING that follows the idle GOAWAY
        assert outcome.closed
        assert [f.error_code for f in outcome.frames if isinstance(f, hf.GoAwayFrame)][:1] == [0]
        await wait_until(lambda: not server.connections)


async def test_connections_past_the_cap_are_refused_and_the_rest_served(tmp_path: Path) -> None:
    limits = Limits(max_connections=4)
    errors: list[str] = []
    async with serving(tmp_path, {ECHO: echo}, limits=limits, on_error=errors.append) as (server, path):
        holders = [await RawClient.connect(path) for _ in range(3)]
        try:
            await wait_until(lambda: len(server.connections) == 3)
            await assert_serves(path)  # the fourth
            holders.append(await RawClient.connect(path))
            await wait_until(lambda: len(server.connections) == 4)
            for _ in range(20):  # many more, each refused at once
                outcome = await attack(path, [b""])
                assert outcome.closed
                assert outcome.goaway == ENHANCE_YOUR_CALM
            await holders.pop().close()
            await wait_until(lambda: len(server.connections) == 3)
            await assert_serves(path)
        finally:
            for holder in holders:
                await holder.close()
    assert errors == ["http2_too_many_connections"] * 20


async def test_connections_each_under_their_budget_together_over_the_process_budget(tmp_path: Path) -> None:
    """The largest holder, whatever its connection, ends with RESOURCE_EXHAUSTED; the others go on."""
    release = asyncio.Event()

    async def never_reads(call: Call) -> None:
        await release.wait()
        while await call.read() is not None:
            pass

    limits = Limits(receive_buffer=800_000, connection_receive_buffer=400_000)
    errors: list[str] = []
    routes = {ECHO: echo, WAITS: never_reads}
    async with serving(tmp_path, routes, limits=limits, on_error=errors.append) as (server, path):
        clients = [await RawClient.connect(path) for _ in range(3)]
        try:
            sizes = [300_000, 320_000, 200_000]  # each under 400_000, together (with the calls) over 800_000
            held = 0
            for client, size in zip(clients, sizes, strict=True):
                head = grpc_frame(b"p" * 1_000_000)[: size + 5]  # a message that never completes
                client.send(hf.HeadersFrame(1, client.block(request_headers(WAITS)), flags=["END_HEADERS"]))
                for offset in range(0, len(head), 16_384):
                    client.send(hf.DataFrame(1, head[offset : offset + 16_384]))
                held += size + 5 + CALL_COST
                if client is not clients[-1]:
                    target = held
                    await wait_until(lambda: server.budget.used == target)  # noqa: B023 - awaited at once
            biggest = clients[1]
            assert (await biggest.finish(1))[b"grpc-status"] == b"8"
            assert server.budget.used <= limits.receive_buffer
            await assert_serves(path)
            release.set()
            for client in (clients[0], clients[2]):
                assert not client.ended(1)
                client.send(hf.DataFrame(1, b"", flags=["END_STREAM"]))  # ends inside the message
                assert (await client.finish(1))[b"grpc-status"] == b"13"
        finally:
            for client in clients:
                await client.close()
    assert errors.count("http2_resource_exhausted") == 1


async def test_open_calls_count_against_the_budget_and_past_it_new_streams_are_refused(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def waits(call: Call) -> None:
        await release.wait()

    room = 5
    limits = Limits(receive_buffer=room * CALL_COST, connection_receive_buffer=room * CALL_COST)
    routes = {ECHO: echo, WAITS: waits}
    async with serving(tmp_path, routes, limits=limits) as (server, path), raw_client(path) as raw:
        ids = list(range(1, 2 * (room + 2), 2))
        raw.send(*(hf.HeadersFrame(sid, raw.block(request_headers(WAITS)), flags=["END_HEADERS"]) for sid in ids))
        await raw.until(lambda: len(raw.of(hf.RstStreamFrame)) == 2)
        assert [(f.stream_id, f.error_code) for f in raw.of(hf.RstStreamFrame)] == [(ids[-2], 0x7), (ids[-1], 0x7)]
        assert server.budget.used == room * CALL_COST
        release.set()
        for sid in ids[:room]:
            assert (await raw.finish(sid))[b"grpc-status"] == b"0"
        await wait_until(lambda: server.budget.used == 0)
        await assert_serves(path)


async def test_the_concurrency_limit_still_refuses_streams_past_it(tmp_path: Path) -> None:
    """Refusals past MAX_CONCURRENT_STREAMS are counted as premature, but a few are tolerated."""
    release = asyncio.Event()

    async def waits(call: Call) -> None:
        await release.wait()

    errors: list[str] = []
    async with serving(tmp_path, {ECHO: waits}, on_error=errors.append) as (_, path), raw_client(path) as raw:
        count = MAX_CONCURRENT_STREAMS + 10
        raw.send(
            *(hf.HeadersFrame(2 * i + 1, raw.block(request_headers()), flags=["END_HEADERS"]) for i in range(count))
        )
        await raw.until(lambda: len(raw.of(hf.RstStreamFrame)) == 10)
        assert {f.error_code for f in raw.of(hf.RstStreamFrame)} == {0x7}
        release.set()
        await raw.until(lambda: all(raw.ended(2 * i + 1) for i in range(MAX_CONCURRENT_STREAMS)))
    assert not errors
