"""``dicom-node run`` (the whole node) and ``dicom-node worker`` (a Celery worker for an external broker)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from models.errors import ConfigError
from node.cli.common import PANEL_RUN, ConfigOption, checked_settings
from node.logutil import setup_logging
from node.version import software_version

log = logging.getLogger("node.cli")

WORKER_RESTART_DELAY_SECONDS = 5.0
"""How long ``run`` waits before restarting an embedded worker that exited."""


GPU_QUEUE = "gpu"
"""The queue ``worker --gpus`` consumes unless ``--queues`` names others."""


def gpu_workers(config: Path, gpus: str, queues: str = "",
                environ: Mapping[str, str] = os.environ) -> list[tuple[list[str], dict[str, str]]]:
    """(command, environment) of one worker process per GPU: ``--concurrency 1`` and
    ``CUDA_VISIBLE_DEVICES`` naming that GPU only (an index or a ``GPU-...`` UUID), so each process
    sees one device as ``cuda:0`` and never initialises another."""
    from node.queue import worker_command

    ids = [g.strip() for g in gpus.split(",")]
    if not all(re.fullmatch(r"[A-Za-z0-9-]{1,64}", g) for g in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {gpus!r}: give distinct GPU indices or UUIDs, comma-separated (e.g. 0,1)")
    cmd = worker_command(config, concurrency=1, queues=queues or GPU_QUEUE)
    return [(cmd, {**environ, "CUDA_VISIBLE_DEVICES": g}) for g in ids]


class WorkerSupervisor:
    """Starts a worker process (``python -m workers``, or ``command`` with ``env``) and restarts it if it dies."""

    def __init__(self, config: Path, command: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.command = command
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        from node.queue import worker_command

        return subprocess.Popen(self.command or worker_command(self.config), env=self.env, start_new_session=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.proc = self._spawn()
            log.info("worker process started (pid %d%s)", self.proc.pid,
                     f", CUDA_VISIBLE_DEVICES={self.env['CUDA_VISIBLE_DEVICES']}" if self.env else "")
            rc = self.proc.wait()
            if self._stop.is_set():
                return
            log.error("worker process exited with %s; restarting in %.0f s", rc, WORKER_RESTART_DELAY_SECONDS)
            self._stop.wait(WORKER_RESTART_DELAY_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # Celery warm shutdown: the running job finishes or is redelivered
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._thread.join(timeout=5)


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop


def run(config: ConfigOption) -> int:
    """Run the whole node (receiver, HTTP service, router, sender, workers).

    Starts the DICOM receiver, the HTTP service (dashboard, DICOMweb, REST API), assembler, router,
    sender, storage lifecycle and, with queue.embedded_workers, its own worker processes. Stops cleanly
    on SIGTERM or Ctrl-C.
    """
    settings = checked_settings(config, node_files=True)
    setup_logging(settings.logging.level, "node")
    from node.service import NodeService

    service = NodeService(settings)
    stop = _stop_on_signals()
    supervisor = None
    if settings.queue.embedded_workers:
        supervisor = WorkerSupervisor(Path(config).resolve())
        supervisor.start()
    service.start()
    broker = "embedded file-system broker" if settings.embedded_broker else "external broker"
    log.info("dicom-node %s running (%s, storage %s)", software_version(), broker, settings.node.storage_dir)
    while not stop.wait(1.0):
        pass
    service.stop()
    if supervisor is not None:
        supervisor.stop()
    log.info("stopped")
    return 0


def worker(
    config: ConfigOption,
    concurrency: Annotated[int, typer.Option(help="worker processes (0: queue.worker_concurrency)")] = 0,
    queues: Annotated[str, typer.Option(
        help="comma-separated queues to consume (default: cpu and every queue named under models:); "
        "with --gpus the default is gpu")] = "",
    gpus: Annotated[str, typer.Option(
        help="one worker process per GPU (comma-separated indices or UUIDs, e.g. 0,1), each with "
        "CUDA_VISIBLE_DEVICES set to its GPU and concurrency 1")] = "",
) -> int:
    """Run a Celery worker (for queue.broker_url = redis://...).

    The embedded broker's workers are started by run. Becomes python -m workers (same process id, so a
    supervisor's signals reach it); with --gpus it supervises one such process per GPU (restarted if it
    exits) until SIGTERM.
    """
    from node.queue import worker_command  # celery

    checked_settings(config)  # refuse a bad configuration here, with the CLI's message and exit code
    if gpus:
        return _gpu_workers(Path(config).resolve(), gpus, queues)
    cmd = worker_command(Path(config), concurrency=concurrency, queues=queues)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def _gpu_workers(config: Path, gpus: str, queues: str) -> int:
    specs = gpu_workers(config, gpus, queues)
    setup_logging("INFO", "node")
    stop = _stop_on_signals()
    supervisors = [WorkerSupervisor(config, cmd, env) for cmd, env in specs]
    for s in supervisors:
        s.start()
    stop.wait()
    stoppers = [threading.Thread(target=s.stop) for s in supervisors]  # all warm shutdowns at once
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()
    return 0


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL_RUN)(run)
    app.command(rich_help_panel=PANEL_RUN)(worker)
