"""The gRPC server directly, as a (misbehaving) Envoy would talk to it."""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from sidecar.config import TRANSPORTS
from sidecar.extproc.http2.frames import PREFACE
from sidecar.stack.sidecar import SidecarProcess
from tests.support.testplugins import TP


def headers_message(*pairs: tuple[str, bytes]) -> pb.ProcessingRequest:
    header_map = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs])
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map))


@pytest.fixture(params=TRANSPORTS)
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[SidecarProcess, Path]]:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"transport: {request.param}\nmetrics: 127.0.0.1:0\n"
        f"chains:\n  default: ['{TP}AddHeaders', '{TP}Raiser']\n  meta: ['{TP}Metadata']\n"
    )
    sock = tmp_path / "s.sock"
    with SidecarProcess(["-c", str(config), "--listen", f"unix:{sock}"], [sock]) as proc:
        yield proc, sock


def stub(sock: Path) -> tuple[grpc.Channel, pb_grpc.ExternalProcessorStub]:
    channel = grpc.insecure_channel(f"unix:{sock}")
    return channel, pb_grpc.ExternalProcessorStub(channel)


def test_misbehaving_streams_fail_alone(server: tuple[SidecarProcess, Path]) -> None:
    proc, sock = server
    channel, client = stub(sock)
    with channel:
        body_first = [pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x"))]
        with pytest.raises(grpc.RpcError) as info:
            list(client.Process(iter(body_first), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "before request_headers" in (info.value.details() or "")

        with pytest.raises(grpc.RpcError) as info:
            list(client.Process(iter([pb.ProcessingRequest()]), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        with pytest.raises(grpc.RpcError) as info:
            list(client.Process(iter([headers_message()]), timeout=5, metadata=[("x-sidecar-chain", "nope")]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # absent headers, non-UTF-8 bytes: answered per protocol, and the server still serves
        replies = list(client.Process(iter([headers_message(("x-bin", b"\xff\x00"))]), timeout=5))
        assert len(replies) == 1
        mutation = replies[0].request_headers.response.header_mutation
        assert [(h.header.key, h.header.raw_value) for h in mutation.set_headers] == [("x-added", b"yes")]

        replies = list(
            client.Process(iter([headers_message((":path", b"/m"))]), timeout=5, metadata=[("x-sidecar-chain", "meta")])
        )
        assert replies[0].dynamic_metadata["envoy-sidecar"]["path"] == "/m"
        assert replies[0].HasField("mode_override")  # the meta chain needs less than the filter sends
    assert "closing ext_proc stream" in proc.logs()


def test_metrics_count_messages_and_plugin_errors(server: tuple[SidecarProcess, Path]) -> None:
    proc, sock = server
    channel, client = stub(sock)
    with channel:
        list(client.Process(iter([headers_message()]), timeout=5))
        replies = list(client.Process(iter([headers_message(("x-boom", b"1"))]), timeout=5))
    assert replies[0].immediate_response.status.code == 500
    match = re.search(r"metrics on (http://\S+/metrics)", proc.logs())
    assert match, proc.logs()
    with urllib.request.urlopen(match.group(1), timeout=5) as response:
        text = response.read().decode()
    assert re.search(r'sidecar_extproc_messages_total\{phase="request_headers"\} 2\.0', text)
    assert 'sidecar_plugin_errors_total{phase="request_headers",plugin="raiser"} 1.0' in text
    assert 'sidecar_extproc_streams_total{chain="default"} 2.0' in text


def test_transport_errors_are_counted(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"metrics: 127.0.0.1:0\nplugins: ['{TP}AddHeaders']\n")
    sock = tmp_path / "s.sock"
    with SidecarProcess(["-c", str(config), "--listen", f"unix:{sock}"], [sock]) as proc:
        with socket.socket(socket.AF_UNIX) as peer:  # an HTTP/2 client whose header block is garbage
            peer.settimeout(5)
            peer.connect(str(sock))
            peer.sendall(
                PREFACE + struct.pack(">IBI", 0 << 8 | 0x4, 0, 0) + struct.pack(">IBI", 1 << 8 | 0x1, 4, 1) + b"\xbe"
            )
            while peer.recv(65536):  # until the server closes the connection
                pass
        match = re.search(r"metrics on (http://\S+/metrics)", proc.logs())
        assert match, proc.logs()
        with urllib.request.urlopen(match.group(1), timeout=5) as response:
            text = response.read().decode()
        assert 'sidecar_extproc_stream_errors_total{reason="http2_compression_error"} 1.0' in text
        channel, client = stub(sock)
        with channel:  # and the server goes on serving
            assert list(client.Process(iter([headers_message()]), timeout=5))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tcp_with_tls(tmp_path: Path, transport: str) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "tls.yaml"
    config.write_text(
        f"transport: {transport}\nplugins: ['{TP}AddHeaders']\ntcp: 127.0.0.1:{port}\n"
        f"tls: {{cert: {tmp_path / 'cert.pem'}, key: {tmp_path / 'key.pem'}}}\n"
    )
    sock = tmp_path / "s.sock"
    with SidecarProcess(["-c", str(config), "--listen", f"unix:{sock}"], [sock]):
        creds = grpc.ssl_channel_credentials((tmp_path / "cert.pem").read_bytes())
        with grpc.secure_channel(
            f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as channel:
            replies = list(pb_grpc.ExternalProcessorStub(channel).Process(iter([headers_message()]), timeout=10))
        assert replies[0].request_headers.response.header_mutation.set_headers[0].header.key == "x-added"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError):
            list(pb_grpc.ExternalProcessorStub(plain).Process(iter([headers_message()]), timeout=5))
