"""Logs: tracebacks rate-limited per kind with a count of the suppressed ones, and the optional access line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from sidecar.logs import TRACEBACK_BURST, TracebackLimiter
from sidecar.stack.sidecar import SidecarProcess
from tests.support.messages import headers_message
from tests.support.meterplugins import MP
from tests.support.testplugins import TP

FAILURES = 300


def json_lines(proc: SidecarProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.logs().splitlines() if line.startswith("{")]


def test_a_plugin_failing_on_every_request_writes_a_bounded_number_of_tracebacks(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with SidecarProcess(["--plugin", f"{TP}Raiser", "--listen", f"unix:{sock}"], [sock]) as proc:
        error_ids = []
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            client = pb_grpc.ExternalProcessorStub(channel)
            for i in range(FAILURES):
                (reply,) = client.Process(iter([headers_message(("x-boom", str(i).encode()))]), timeout=5)
                assert reply.immediate_response.status.code == 500
                (header,) = [
                    h for h in reply.immediate_response.headers.set_headers if h.header.key == "x-sidecar-error-id"
                ]
                error_ids.append(header.header.raw_value.decode())
        failures = [line for line in json_lines(proc) if line.get("plugin") == "raiser"]
    assert len(failures) == FAILURES  # every failure keeps its line: the error id a client got resolves
    assert [line["error_id"] for line in failures] == error_ids
    with_traceback = [line for line in failures if "exception" in line]
    assert len(with_traceback) == TRACEBACK_BURST
    assert all("RuntimeError" in line["exception"] for line in with_traceback)
    assert failures[-1]["tracebacks_suppressed"] == FAILURES - TRACEBACK_BURST
    assert "traceback suppressed" in failures[-1]["message"]
    assert all("exception" not in line for line in failures[TRACEBACK_BURST:])  # the first ones kept theirs


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _failure(name: str = "sidecar.extproc", plugin: str = "p", message: str = "boom") -> logging.LogRecord:
    try:
        raise ValueError(message)  # one raise site: every record is the same kind unless told otherwise
    except ValueError as exc:
        record = logging.LogRecord(name, logging.ERROR, __file__, 1, "plugin failed", None, (ValueError, exc, None))
    record.plugin = plugin
    return record


def test_the_budget_is_per_kind_and_window_and_reports_what_it_hid() -> None:
    clock = _Clock()
    limiter = TracebackLimiter(burst=2, window=10.0, clock=clock)
    records = [_failure(message=f"request {i} from 10.0.0.{i}") for i in range(5)]  # messages differ: one kind
    assert all(limiter.filter(r) for r in records)  # lines are never dropped
    assert [r.exc_info is not None for r in records] == [True, True, False, False, False]
    assert [getattr(r, "tracebacks_suppressed", None) for r in records] == [None, None, 1, 2, 3]
    other = _failure(plugin="q")  # another plugin has its own budget
    limiter.filter(other)
    assert other.exc_info is not None
    clock.now += 10.0
    fresh = _failure()
    limiter.filter(fresh)
    assert fresh.exc_info is not None
    assert getattr(fresh, "tracebacks_suppressed", None) == 3
    assert "3 similar tracebacks were suppressed" in fresh.getMessage()
    plain = logging.LogRecord("sidecar", logging.ERROR, __file__, 1, "no exception", None, None)
    assert limiter.filter(plain) and not hasattr(plain, "tracebacks_suppressed")


def test_the_kinds_remembered_are_bounded() -> None:
    limiter = TracebackLimiter(burst=1, window=60.0)
    for i in range(5000):  # a plugin name per request would be a hostile label
        limiter.filter(_failure(plugin=f"plugin-{i}"))
    assert len(limiter._kinds) <= 256


def test_the_access_line_names_request_chain_plugins_outcome_and_duration(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    args = ["--plugin", f"{MP}Metered", "--plugin", f"{TP}AddHeaders", "--listen", f"unix:{sock}", "--access-log"]
    with SidecarProcess(args, [sock]) as proc:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            client = pb_grpc.ExternalProcessorStub(channel)
            long_rid = ("rid-long-" + "x" * 10_000, ())  # a client's x-request-id: capped in the line
            cases = (("rid-ok", ()), ("rid-deny", (("x-deny", b"1"),)), ("rid-boom", (("x-boom", b"1"),)), long_rid)
            for rid, extra in cases:
                list(client.Process(iter([headers_message(("x-request-id", rid.encode()), *extra)]), timeout=5))
            with pytest.raises(grpc.RpcError):  # a protocol error: a body before any headers
                list(client.Process(iter([pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x"))]), timeout=5))
        lines = json_lines(proc)
    access = {line["request_id"]: line for line in lines if line["logger"] == "sidecar.access"}
    ok, deny, boom = access["rid-ok"], access["rid-deny"], access["rid-boom"]
    assert ("rid-long-" + "x" * 10_000)[:128] in access
    assert ok["chain"] == "default" and ok["outcome"] == "ok"
    assert ok["plugins"] == ["metered", "add-headers"]
    assert isinstance(ok["duration_ms"], float) and 0 <= ok["duration_ms"] < 5000
    assert deny["outcome"] == "respond" and deny["status"] == 401 and deny["responder"] == "metered"
    assert deny["plugins"] == ["metered"]  # the chain stopped there
    (failure,) = [
        line
        for line in lines
        if line.get("plugin") == "metered" and "error_id" in line and line["logger"] != "sidecar.access"
    ]
    assert boom["outcome"] == "plugin_error" and boom["error_id"] == failure["error_id"]
    assert [line["outcome"] for line in access.values()].count("protocol") == 1


def test_no_access_line_unless_asked(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with SidecarProcess(["--plugin", f"{TP}AddHeaders", "--listen", f"unix:{sock}"], [sock]) as proc:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            list(pb_grpc.ExternalProcessorStub(channel).Process(iter([headers_message()]), timeout=5))
        assert not [line for line in json_lines(proc) if line["logger"] == "sidecar.access"]
