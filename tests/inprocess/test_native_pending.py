"""PENDING: the work goes on on another thread, `schedule(handle)` brings the stream back to its worker, and what
Envoy held (headers, a body) is released only after `resume()`; a stream that ends while pending neither crashes
Envoy nor leaks."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest

from tests.support.inprocess_envoy import InProcessEnvoy, raw_exchange
from tests.support.wait import wait_for

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def envoy() -> Iterator[InProcessEnvoy]:
    with InProcessEnvoy("buffered") as running:
        yield running


def _stats(envoy: InProcessEnvoy) -> dict[str, int]:
    status, _, body = envoy.request("/stats")
    assert status == 200
    stats: dict[str, int] = json.loads(body)
    return stats


def test_headers_held_until_resume_then_changed(envoy: InProcessEnvoy) -> None:
    status, headers, body = envoy.request("/pending", headers={"x-delay-ms": "50", "x-remove-me": "x"})
    assert status == 200
    seen = json.loads(body)["headers"]
    assert seen["x-fake-req"] == "1" and "x-remove-me" not in seen
    assert headers["x-fake-resp"] == "1"


def test_schedule_before_the_hook_returns_is_not_lost(envoy: InProcessEnvoy) -> None:
    # Delay 0: the timer thread may call schedule() before Envoy's worker has seen PENDING.
    for _ in range(20):
        status, _, body = envoy.request("/pending", headers={"x-delay-ms": "0"})
        assert status == 200 and json.loads(body)["headers"]["x-fake-req"] == "1"


def test_resume_can_respond(envoy: InProcessEnvoy) -> None:
    status, headers, _ = envoy.request("/pending-respond", headers={"x-delay-ms": "20"})
    assert status == 451
    assert "x-envoy-upstream-service-time" not in headers


def test_a_pending_buffered_body_is_released_only_after_resume(envoy: InProcessEnvoy) -> None:
    status, _, body = envoy.request("/pending-upper", method="POST", body=b"quiet please")
    echo = json.loads(body)
    assert status == 200
    assert echo["body"] == "QUIET PLEASE"
    assert echo["headers"]["content-length"] == "12"


def test_a_client_that_leaves_while_pending_ends_its_stream_and_a_late_schedule_is_refused(
    envoy: InProcessEnvoy,
) -> None:
    before = _stats(envoy)
    with socket.create_connection(envoy.address) as sock:
        sock.sendall(b"GET /pending HTTP/1.1\r\nhost: t\r\nx-delay-ms: 300\r\n\r\n")
        wait_for(lambda: _stats(envoy)["opened"] >= before["opened"] + 2, what="the pending stream to open")
    # The stream is closed when the client leaves; the fake's schedule() 300 ms later finds it gone.
    wait_for(lambda: _stats(envoy)["late"] == before["late"] + 1, what="schedule() to return False")
    after = _stats(envoy)
    assert after["opened"] - after["closed"] == 1  # only the /stats request itself is open
    assert envoy.envoy is not None and envoy.envoy.running


def test_a_stream_never_scheduled_is_closed_when_the_client_leaves(envoy: InProcessEnvoy) -> None:
    before = _stats(envoy)
    with socket.create_connection(envoy.address) as sock:
        sock.sendall(b"GET /pending-never HTTP/1.1\r\nhost: t\r\n\r\n")
        wait_for(lambda: _stats(envoy)["opened"] >= before["opened"] + 2, what="the pending stream to open")
    wait_for(lambda: (s := _stats(envoy))["opened"] - s["closed"] == 1, what="the pending stream to close")


async def _one(address: tuple[str, int], delay_ms: int) -> int:
    reader, writer = await asyncio.open_connection(*address)
    try:
        request = f"GET /pending HTTP/1.1\r\nhost: t\r\nx-delay-ms: {delay_ms}\r\nconnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        raw = await reader.read()
        return int(raw.split(b" ", 2)[1])
    finally:
        writer.close()


def test_a_thousand_pending_streams_at_once(envoy: InProcessEnvoy) -> None:
    async def run() -> list[int]:
        # All 1,000 are open and pending together: each waits 500 ms on its timer thread.
        return await asyncio.wait_for(asyncio.gather(*(_one(envoy.address, 500) for _ in range(1000))), 90)

    statuses = asyncio.run(run())
    assert statuses == [200] * 1000
    wait_for(lambda: (s := _stats(envoy))["opened"] - s["closed"] == 1, what="every stream to close")


def test_headers_and_then_the_buffered_body_both_pending(envoy: InProcessEnvoy) -> None:
    # The headers wait for resume(), the body arrives meanwhile, then the body waits too; its content-length fix
    # still applies because the headers were never passed on.
    status, _, body = envoy.request("/pending-both", method="POST", body=b"twice held", headers={"x-delay-ms": "30"})
    echo = json.loads(body)
    assert status == 200
    assert (echo["body"], echo["headers"]["content-length"]) == ("TWICE HELD", "10")


@pytest.mark.parametrize(("trailer", "status"), [("x-deny", 403), ("x-other", 200)])
def test_trailers_that_arrive_while_the_body_is_pending_run_after_it(
    envoy: InProcessEnvoy, trailer: str, status: int
) -> None:
    request = (
        b"POST /pending-upper HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        b"5\r\nhello\r\n0\r\n" + f"{trailer}: 1\r\n\r\n".encode()
    )
    raw = raw_exchange(envoy.address, request)
    assert int(raw.split(b" ", 2)[1]) == status
    if status == 200:
        assert b"x-request-body-calls: 1\r\n" in raw and b"HELLO" in raw


def test_a_storm_of_schedule_calls_resumes_once(envoy: InProcessEnvoy) -> None:
    before = _stats(envoy)["resumed"]
    assert envoy.request("/pending-storm")[0] == 200
    assert envoy.request("/pending-storm")[0] == 200
    # Wakes that come after the resume (the storm goes on) find nothing pending or the stream gone: dropped, so
    # each stream resumed once.
    assert _stats(envoy)["resumed"] - before == 2


def test_a_late_schedule_does_not_resume_the_next_phase_early(envoy: InProcessEnvoy) -> None:
    # /pending-storm-twice: the request headers go PENDING and get a storm of wakes that lasts past their resume
    # (some land during the resume() call); the response headers then go PENDING and must be woken only by their
    # own, later schedule().
    status, headers, _ = envoy.request("/pending-storm-twice")
    assert status == 200
    assert "x-resumed-early" not in headers
    assert headers["x-fake-resp"] == "late-but-right"


def test_schedule_with_handles_and_values_that_are_not_a_live_stream(envoy: InProcessEnvoy) -> None:
    status, _, body = envoy.request("/schedule-garbage")
    assert status == 200
    # Other slots or generations: False (the registry has no such stream); not an int, or outside 0..2**64-1:
    # the Python error, never a wake-up.
    assert json.loads(body) == [
        "False",
        "False",
        "False",
        "False",
        "False",
        "OverflowError",
        "OverflowError",
        "TypeError",
        "TypeError",
        "TypeError",
    ]


def test_a_late_schedule_does_not_resume_the_body_phase_that_follows_at_once(envoy: InProcessEnvoy) -> None:
    # The headers' resume is followed, in the same event, by the buffered body's call (it has all arrived), which
    # goes PENDING: a wake-up posted for the headers during their resume() must not resume the body.
    status, _, body = envoy.request("/pending-storm-body", method="POST", body=b"storm")
    echo = json.loads(body)
    assert status == 200
    assert "x-resumed-early" not in echo["headers"]
    assert echo["body"] == "STORM"
