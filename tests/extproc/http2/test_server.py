"""Stopping the HTTP/2 server: graceful GOAWAY, the grace period, connections accepted while stopping."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hyperframe import frame as hf

from sidecar.extproc.http2 import Call, Http2Server
from sidecar.extproc.http2.frames import PREFACE
from tests.support.h2peers import (
    DEADLINE,
    ECHO,
    RawClient,
    echo,
    feed,
    grpc_frame,
    parse_frames,
    raw_client,
    raw_frame,
    request_frame,
    serving,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.asyncio


async def test_graceful_stop_lets_a_call_in_flight_finish(tmp_path: Path) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(call: Call) -> None:
        started.set()
        await release.wait()
        await call.send(await call.read() or b"")

    async with serving(tmp_path, {ECHO: handler}) as (server, path), raw_client(path) as raw:
        raw.send(request_frame(raw), hf.DataFrame(1, grpc_frame(b"late"), flags=["END_STREAM"]))
        await asyncio.wait_for(started.wait(), DEADLINE)
        stopping = asyncio.create_task(server.stop(grace=5))
        await raw.until(lambda: len(raw.of(hf.GoAwayFrame)) == 2)  # the client acks the server's PING
        first, final = raw.of(hf.GoAwayFrame)
        assert (first.last_stream_id, first.error_code) == (2**31 - 1, 0)
        assert (final.last_stream_id, final.error_code) == (1, 0)
        assert not stopping.done()

        release.set()
        headers = await raw.finish(1)
        await raw.read_to_eof()
        await asyncio.wait_for(stopping, DEADLINE)
    assert raw.messages(1) == [b"late"]
    assert headers[b"grpc-status"] == b"0"
    with pytest.raises(OSError):
        await RawClient.connect(path)  # no longer listening


async def test_graceful_stop_serves_a_call_that_crossed_the_first_goaway(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handler(call: Call) -> None:
        message = await call.read()
        await release.wait()
        await call.send(message or b"")

    async with serving(tmp_path, {ECHO: handler}) as (server, path), raw_client(path) as raw:
        await raw.until(lambda: bool(raw.of(hf.SettingsFrame)))
        raw.send(request_frame(raw), hf.DataFrame(1, grpc_frame(b"crossing"), flags=["END_STREAM"]))
        # The task's first step (GOAWAY + PING) runs before the loop polls the socket holding the request:
        # the request crosses the first GOAWAY, as on a real wire. Its last_stream_id 2^31-1 admits it.
        stopping = asyncio.create_task(server.stop(grace=5))
        await raw.until(lambda: len(raw.of(hf.GoAwayFrame)) == 2)
        assert [goaway.last_stream_id for goaway in raw.of(hf.GoAwayFrame)] == [2**31 - 1, 1]
        release.set()
        headers = await raw.finish(1)
        await asyncio.wait_for(stopping, DEADLINE)
    assert raw.messages(1) == [b"crossing"]
    assert headers[b"grpc-status"] == b"0"


async def test_stop_cancels_calls_still_running_after_the_grace_period(tmp_path: Path) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(call: Call) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving(tmp_path, {ECHO: handler}) as (server, path), raw_client(path) as raw:
        raw.send(request_frame(raw))
        await asyncio.wait_for(started.wait(), DEADLINE)
        began = time.monotonic()
        await asyncio.wait_for(server.stop(grace=0.2), DEADLINE)
        assert time.monotonic() - began < 2
        assert cancelled.is_set()
        headers = await raw.finish(1)
        await raw.read_to_eof()
    assert headers[b"grpc-status"] == b"14"


async def test_a_connection_accepted_while_stopping_is_drained_too() -> None:
    server = Http2Server({ECHO: echo}, max_message=64)
    hello = [PREFACE + raw_frame(0x4, 0, 0)]
    early, early_transport = await feed(server, hello)
    stopping = asyncio.create_task(server.stop(grace=5))
    await wait_until(lambda: hf.GoAwayFrame in [type(f) for f in parse_frames(bytes(early_transport.out))])
    late, late_transport = await feed(server, hello)  # its accept raced the listener's close
    for conn, transport in ((early, early_transport), (late, late_transport)):
        (ping,) = [f for f in parse_frames(bytes(transport.out)) if isinstance(f, hf.PingFrame)]
        conn.data_received(hf.PingFrame(0, ping.opaque_data, flags=["ACK"]).serialize())  # the peer's ack
    await asyncio.wait_for(stopping, 1)  # not the whole grace period
    for transport in (early_transport, late_transport):
        goaways = [f for f in parse_frames(bytes(transport.out)) if isinstance(f, hf.GoAwayFrame)]
        assert [goaway.last_stream_id for goaway in goaways] == [2**31 - 1, 0]
        assert transport.lost
