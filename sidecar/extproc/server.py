"""The ext_proc gRPC server on uvloop, with health checking and graceful shutdown.

Each process serves one Unix socket (and optionally TCP with TLS), over the native HTTP/2 transport
(`http2/`) or grpcio's grpc.aio (`transport: grpcio`); both run each stream through `lifetime.serve`. The stream picks
a chain from the `x-sidecar-chain` gRPC initial metadata (set per route in Envoy's ExtProcPerRoute
`grpc_initial_metadata`), falling back to the default chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sidecar.chains import Chain, Registry
from sidecar.config import Limits, SidecarConfig, TlsConfig, parse_host_port
from sidecar.errors import ConfigError, ProtocolError, StreamFailure
from sidecar.extproc.health import Health
from sidecar.extproc.http2 import Call, Http2Server
from sidecar.extproc.lifetime import Read, Write, WriteEncoded, serve
from sidecar.extproc.metrics import Metrics, write_snapshot
from sidecar.extproc.processor import StreamProcessor
from sidecar.extproc.record import StreamRecord
from sidecar.extproc.status import CallError, Status
from sidecar.wire import CHAIN_METADATA_KEY, PROCESS_METHOD, SERVICE_NAME

if TYPE_CHECKING:
    from sidecar.extproc.tracing import Tracing

__all__ = ["ExtProcServer", "grpcio_options", "prepare_unix_socket"]

log = logging.getLogger("sidecar.extproc")

# Bodies in BUFFERED mode arrive as one message: allow well past Envoy's default buffer limit (1 MiB).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_MAX_UNIX_PATH = 107
METRICS_PUBLISH_SECONDS = 1.0


def prepare_unix_socket(path: Path) -> None:
    """Make `path` bindable: parent created, a stale socket removed, a live one refused."""
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ConfigError(f"listen: socket path {str(path)!r} is longer than {_MAX_UNIX_PATH} bytes")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"listen: cannot create socket directory {str(path.parent)!r}: {exc.strerror}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"listen: socket directory {str(path.parent)!r} is not writable")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"listen: {str(path)!r} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: its server is gone
        return
    except OSError as exc:
        raise ConfigError(f"listen: cannot probe existing socket {str(path)!r}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"listen: socket {str(path)!r} is in use by another running server")


@contextlib.contextmanager
def _umask_for(mode: int) -> Iterator[None]:
    """The socket file never exists with looser permissions than `mode`, not even before the chmod."""
    previous = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(previous)


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.client_ca is not None:
            context.load_verify_locations(tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(f"tls: cannot use the certificate, key or client CA: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
    return context


def grpcio_options(limits: Limits) -> list[tuple[str, int]]:
    """grpc.aio's server options: the limits it has an equivalent for (docs/serving.md says which it lacks)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        # A local peer on a Unix socket: no channelz bookkeeping, retries or bandwidth probing
        # (measured ~5-10% less CPU per stream).
        ("grpc.enable_channelz", 0),
        ("grpc.enable_retries", 0),
        ("grpc.http2.bdp_probe", 0),
        # Checked before the handshake: one more connection is closed at once, without a GOAWAY.
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", max(1, round(limits.handshake_timeout * 1000))),
    ]
    if limits.idle_timeout:
        options.append(("grpc.max_connection_idle_ms", max(1, round(limits.idle_timeout * 1000))))
    return options


class ExtProcServer:
    """One serving process: the ext_proc service, gRPC health, optional metrics."""

    def __init__(
        self,
        registry: Registry,
        config: SidecarConfig,
        *,
        socket_path: Path | None,
        metrics: Metrics | None = None,
        snapshot_file: Path | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.socket_path = socket_path
        self.metrics = metrics
        #: With --workers: where this worker publishes its metrics for the supervisor, every second.
        self.snapshot_file = snapshot_file
        self._tracing: Tracing | None = None
        if config.tracing:
            from sidecar.extproc.tracing import Tracing

            self._tracing = Tracing()
        #: A StreamRecord per stream only when something reads it (spans, the access line).
        self._recording = config.tracing or config.access_log
        self._native: Http2Server | None = None
        self._grpcio: grpc.aio.Server | None = None
        self._health = Health()
        self._grpcio_health: health.aio.HealthServicer | None = None
        self._stopping = asyncio.Event()

    # -- the RPC -------------------------------------------------------------------------------

    async def _stream(
        self,
        chain_name: str | None,
        read: Read,
        write: Write,
        metadata: Mapping[str, str] | None = None,
        write_encoded: WriteEncoded | None = None,
    ) -> CallError | None:
        """One ext_proc stream, whatever the transport; how the call must end if not with OK."""
        # A name this sidecar does not know is an error even with one chain: a route meant for another
        # chain (or another sidecar) must not run this one's plugins instead.
        chain: Chain | None = self.registry.chain(chain_name)
        if chain is None:
            log.error("stream asked for an unknown chain; known: %s", ", ".join(self.registry.chains))
            if self.metrics is not None:
                self.metrics.stream_error("unknown_chain")
            return CallError(Status.INVALID_ARGUMENT, "unknown plugin chain")
        if not self._recording:
            processor = StreamProcessor(
                chain, self.registry, metrics=self.metrics, stream_timeout=self.config.stream_timeout
            )
            failed = await self._run(processor, read, write, write_encoded)
            return failed[1] if failed is not None else None
        record = StreamRecord(
            self.metrics, chain.name, tracing=self._tracing, access=self.config.access_log, metadata=metadata
        )
        processor = StreamProcessor(chain, self.registry, metrics=record, stream_timeout=self.config.stream_timeout)
        record.ctx = processor.ctx
        failure: str | None = "internal"  # unless _run returns: an exception nobody expected
        try:
            failed = await self._run(processor, read, write, write_encoded)
            failure = failed[0] if failed is not None else None
        except asyncio.CancelledError:
            failure = "cancelled" if record.cancelled else None  # see lifetime._answer
            raise
        finally:  # every stream gets its access line and its span ended, however it ends
            record.finish(failure)
        return failed[1] if failed is not None else None

    async def _run(
        self, processor: StreamProcessor, read: Read, write: Write, write_encoded: WriteEncoded | None
    ) -> tuple[str, CallError] | None:
        """Serve one stream; how it failed (a metrics reason and the call's end), or None."""
        try:
            await serve(processor, read, write, write_encoded)
        except ProtocolError as exc:
            return "protocol", self._failed(processor, "protocol", CallError(Status.INVALID_ARGUMENT, str(exc)))
        except StreamFailure as exc:
            return "stream", self._failed(processor, "stream", CallError(Status.INTERNAL, str(exc)))
        return None

    def _failed(self, processor: StreamProcessor, reason: str, error: CallError) -> CallError:
        log.warning("closing ext_proc stream: %s", error.message, extra={"request_id": processor.ctx.request_id})
        if self.metrics is not None:
            self.metrics.stream_error(reason)
        return error

    async def _native_process(self, call: Call) -> None:
        parse = pb.ProcessingRequest.FromString

        async def read() -> pb.ProcessingRequest | None:
            data = await call.read()
            if data is None:
                return None
            try:
                return parse(data)
            except DecodeError:
                raise ProtocolError("malformed ProcessingRequest") from None

        async def write(response: pb.ProcessingResponse) -> None:
            await call.send(response.SerializeToString())

        error = await self._stream(call.metadata.get(CHAIN_METADATA_KEY), read, write, call.metadata, call.send)
        if error is not None:
            raise error

    async def Process(  # the grpcio method name
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        async def read() -> pb.ProcessingRequest | None:
            request = await context.read()
            return None if request is grpc.aio.EOF else request

        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        chain_name = metadata.get(CHAIN_METADATA_KEY)
        error = await self._stream(chain_name, read, context.write, metadata)
        if error is not None:
            await context.abort(grpc.StatusCode[error.status.name], error.message)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.socket_path is not None:
            prepare_unix_socket(self.socket_path)
        if self.config.transport == "grpcio":
            await self._start_grpcio()
        else:
            await self._start_native()
        if self.socket_path is not None:
            os.chmod(self.socket_path, self.config.socket_mode)
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
            if self._grpcio_health is not None:
                await self._grpcio_health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving ext_proc",
            extra={
                "socket": str(self.socket_path) if self.socket_path else None,
                "tcp": self.config.tcp,
                "chains": sorted(self.registry.chains),
                "pid": os.getpid(),
                "transport": self.config.transport,
            },
        )

    async def _start_native(self) -> None:
        loop = asyncio.get_running_loop()
        server = Http2Server(
            {PROCESS_METHOD: self._native_process, **self._health.routes()},
            max_message=MAX_MESSAGE_BYTES,
            limits=self.config.limits,
            on_error=self.metrics.stream_error if self.metrics is not None else None,
        )
        self._native = server
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with _umask_for(self.config.socket_mode):
                    sock.bind(str(self.socket_path))
            except OSError as exc:
                sock.close()
                raise ConfigError(f"listen: cannot bind {str(self.socket_path)!r}: {exc.strerror}") from None
            server.add_listener(await loop.create_unix_server(server.protocol, sock=sock))
        if self.config.tcp:
            host, port = parse_host_port(self.config.tcp, "tcp")
            tls = _ssl_context(self.config.tls) if self.config.tls is not None else None
            try:
                listener = await loop.create_server(server.protocol, host.strip("[]"), port, ssl=tls)
            except OSError as exc:
                raise ConfigError(f"tcp: cannot listen on {self.config.tcp!r}: {exc.strerror}") from None
            server.add_listener(listener)

    async def _start_grpcio(self) -> None:
        server = grpc.aio.server(options=grpcio_options(self.config.limits))
        pb_grpc.add_ExternalProcessorServicer_to_server(self, server)
        self._grpcio_health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._grpcio_health, server)
        if self.socket_path is not None:
            try:
                with _umask_for(self.config.socket_mode):
                    bound = server.add_insecure_port(f"unix:{self.socket_path}")
            except RuntimeError as exc:
                raise ConfigError(f"listen: cannot bind {str(self.socket_path)!r}: {exc}") from None
            if not bound:
                raise ConfigError(f"listen: cannot bind {str(self.socket_path)!r}")
        if self.config.tcp:
            self._add_grpcio_tcp(server, self.config.tcp)
        await server.start()
        self._grpcio = server

    def _add_grpcio_tcp(self, server: grpc.aio.Server, address: str) -> None:
        tls = self.config.tls
        try:
            if tls is None:
                bound = server.add_insecure_port(address)
            else:
                ca = tls.client_ca.read_bytes() if tls.client_ca else None
                creds = grpc.ssl_server_credentials(
                    [(tls.key.read_bytes(), tls.cert.read_bytes())], root_certificates=ca, require_client_auth=bool(ca)
                )
                bound = server.add_secure_port(address, creds)
        except OSError as exc:
            raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
        except RuntimeError as exc:
            raise ConfigError(f"tcp: cannot listen on {address!r}: {exc}") from None
        if not bound:
            raise ConfigError(f"tcp: cannot listen on {address!r}")

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (so health checks steer away), then drain in-flight streams within `grace`."""
        native, grpcio_server = self._native, self._grpcio
        self._native = self._grpcio = None
        if native is None and grpcio_server is None:
            return
        grace = self.config.grace_period if grace is None else grace
        self._health.shutdown()
        if native is not None:
            await native.stop(grace)
        if grpcio_server is not None:
            assert self._grpcio_health is not None
            await self._grpcio_health.enter_graceful_shutdown()
            await grpcio_server.stop(grace)
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._tracing is not None:
            await asyncio.to_thread(self._tracing.shutdown)
        log.info("stopped", extra={"pid": os.getpid()})

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        publisher = asyncio.create_task(self._publish_metrics()) if self.snapshot_file is not None else None
        try:
            await self._stopping.wait()
            log.info("shutting down: draining in-flight streams", extra={"grace_period": self.config.grace_period})
        finally:
            await self.stop()
            if publisher is not None:
                publisher.cancel()
                await self._publish()

    async def _publish(self) -> None:
        """Take the snapshot on the loop (plain copies, bounded by the series caps); serialise and write it
        in a thread, so the loop never waits for json or the disk. A failure (a full disk, a plugin's
        collector) is a warning: the next publish tries again."""
        if self.metrics is not None and self.snapshot_file is not None:
            try:
                await asyncio.to_thread(write_snapshot, self.snapshot_file, self.metrics.snapshot())
            except Exception as exc:
                log.warning("cannot publish metrics to %s: %r", self.snapshot_file, exc)

    async def _publish_metrics(self) -> None:
        while True:
            await self._publish()
            await asyncio.sleep(METRICS_PUBLISH_SECONDS)
