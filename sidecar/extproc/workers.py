"""Run the server: in this process, or as N supervised worker processes (one socket each).

The supervisor restarts a worker that dies (with back-off), forwards SIGTERM to all of them, waits for
them to drain, and serves the workers' summed Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.chains import Registry
from sidecar.config import SidecarConfig
from sidecar.extproc.allocator import tune_allocator
from sidecar.extproc.metrics import Metrics, Snapshot, fold_retired, read_snapshots, serve_metrics
from sidecar.extproc.server import ExtProcServer
from sidecar.extproc.stall import watch_stalls

__all__ = ["Supervisor", "run_single"]

log = logging.getLogger("sidecar.workers")

METRICS_DIR_ENV = "SIDECAR_METRICS_DIR"
WORKER_INDEX_ENV = "SIDECAR_WORKER_INDEX"
_BACKOFF_START = 0.2
_BACKOFF_MAX = 10.0
_HEALTHY_AFTER = 30.0


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run_single(registry: Registry, config: SidecarConfig, socket_path: Path | None, *, worker: bool = False) -> int:
    """Serve in this process until SIGTERM/SIGINT; return the exit code.

    A worker does not serve metrics itself: it publishes them for its supervisor.
    """
    _tune_malloc(config)
    metrics = Metrics()
    snapshot_file = None
    if worker:
        metrics.worker = os.environ.get(WORKER_INDEX_ENV, str(os.getpid()))
        metrics.publish_registry = True
        directory = os.environ.get(METRICS_DIR_ENV)
        snapshot_file = Path(directory) / f"{os.getpid()}.json" if directory else None
    elif config.metrics:
        port = serve_metrics(config.metrics, metrics.snapshot)
        log.info("metrics on http://%s:%d/metrics", config.metrics.rpartition(":")[0], port)
    server = ExtProcServer(registry, config, socket_path=socket_path, metrics=metrics, snapshot_file=snapshot_file)
    with _runner() as runner:
        runner.run(_serve_watched(server, config.stall_timeout))
    return 0


def _tune_malloc(config: SidecarConfig) -> None:
    if not config.tune_malloc:
        log.info("malloc thresholds left as they are: tune_malloc is false")
    elif (why_not := tune_allocator()) is not None:
        log.info("malloc thresholds left as they are: %s", why_not)


async def _serve_watched(server: ExtProcServer, stall_timeout: float) -> None:
    """Serve, with the stall watchdog armed from the loop (stall.py) unless `stall_timeout` is 0."""
    watcher = asyncio.create_task(watch_stalls(stall_timeout)) if stall_timeout else None
    try:
        await server.serve_until_signalled()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


class Supervisor:
    """Keeps `len(worker_commands)` worker processes alive until told to stop."""

    def __init__(self, worker_commands: list[list[str]], config: SidecarConfig) -> None:
        self.commands = worker_commands
        self.config = config
        self._stopping = asyncio.Event()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        # Scrapes (a thread) never read the snapshot files while a dead worker's is being folded away.
        self._snapshots_lock = threading.Lock()

    async def _keep_alive(self, index: int, env: dict[str, str]) -> None:
        env = {**env, WORKER_INDEX_ENV: str(index)}
        backoff = _BACKOFF_START
        while not self._stopping.is_set():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(*self.commands[index], env=env)
            self._procs[index] = proc
            log.info("worker %d started", index, extra={"worker": index, "pid": proc.pid})
            code = await proc.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            self._fold_dead_snapshots(Path(env[METRICS_DIR_ENV]))
            if time.monotonic() - started > _HEALTHY_AFTER:
                backoff = _BACKOFF_START
            log.error(
                "worker %d exited with code %s; restarting in %.1fs",
                index,
                code,
                backoff,
                extra={"worker": index, "pid": proc.pid, "exit_code": code},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _metrics_source(self, directory: Path) -> Callable[[], Snapshot]:
        def source() -> Snapshot:
            live = self._live_pids()
            with self._snapshots_lock:
                total = read_snapshots(directory, live)
            total["restarts"] = self.restarts
            return total

        return source

    def _live_pids(self) -> set[int]:
        return {proc.pid for proc in self._procs.values() if proc.returncode is None}

    def _fold_dead_snapshots(self, directory: Path) -> None:
        """One file for every worker that exited, not one per restart (each scrape reads them all)."""
        try:
            with self._snapshots_lock:
                fold_retired(directory, self._live_pids())
        except OSError as exc:
            log.warning("cannot fold the metrics of exited workers in %s: %s", directory, exc.strerror)

    async def _stop_all(self) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        deadline = self.config.grace_period + 5.0
        waits = [proc.wait() for proc in self._procs.values() if proc.returncode is None]
        if not waits:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*waits), deadline)
        except TimeoutError:
            for proc in self._procs.values():
                if proc.returncode is None:
                    proc.kill()

    async def run(self) -> int:
        if self.config.tracing:  # once here, not in N workers crash-looping on it
            from sidecar.extproc.tracing import check_settings

            check_settings()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
        try:
            env = {**os.environ, METRICS_DIR_ENV: metrics_dir}
            if self.config.metrics:
                port = serve_metrics(self.config.metrics, self._metrics_source(Path(metrics_dir)), supervisor=True)
                log.info("metrics on http://%s:%d/metrics", self.config.metrics.rpartition(":")[0], port)
            tasks = [asyncio.create_task(self._keep_alive(i, env)) for i in range(len(self.commands))]
            await self._stopping.wait()
            log.info("shutting down %d workers", len(self.commands))
            await self._stop_all()
            await asyncio.gather(*tasks)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0

    def run_blocking(self) -> int:
        with _runner() as runner:
            return runner.run(self.run())


def worker_command(argv: list[str], index: int) -> list[str]:
    return [sys.executable, "-m", "sidecar", *argv, "--worker-index", str(index)]
